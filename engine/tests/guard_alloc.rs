//! `Guard::check` allocates nothing, proven with a counting global allocator: 10,000 patterns,
//! and every kind of call (allowed by a method, by a service wildcard, rejected, unknown backend,
//! unknown caller, an uppercase host, IP authorities, cluster names, user info).

#![cfg(feature = "guard")]
#![allow(unsafe_code, reason = "a counting global allocator delegates to the system allocator")]
#![allow(clippy::unwrap_used, clippy::panic, reason = "test")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;

use depfence::compile::compile_str;
use depfence::guard::Guard;
use depfence::verdict::Verdict;

struct Counting;

thread_local! {
    /// Allocations made by this thread while counting is on.
    static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> u64 {
    COUNT.with(|c| c.set(Some(0)));
    f();
    COUNT.with(|c| c.replace(None)).unwrap_or(0)
}

/// 100 backends, 100 method patterns each (10,000), plus one service wildcard.
fn policy() -> String {
    let mut text = String::from("version = 1\n[environments]\nprod = \"enforce\"\n");
    for b in 0..100 {
        text.push_str(&format!("[services.backend-{b}]\nendpoints = [{{ ip = \"10.0.{b}.1\", ports = [50051] }}]\n"));
    }
    text.push_str("[services.client]\nallow = [");
    text.push_str(&(0..100).map(|b| format!("{{ service = \"backend-{b}\" }}")).collect::<Vec<_>>().join(", "));
    text.push_str("]\nrpc_allow = [\n");
    for b in 0..100 {
        let rpcs: Vec<String> = (0..100).map(|m| format!("\"/pkg{b}.Service{}/Method{m}\"", m / 10)).collect();
        text.push_str(&format!("  {{ service = \"backend-{b}\", rpcs = [{}] }},\n", rpcs.join(", ")));
    }
    text.push_str("  { service = \"backend-7\", rpcs = [\"/admin.Admin/*\"] },\n]\n");
    text
}

#[test]
fn check_does_not_allocate() {
    let snapshot = compile_str("alloc.toml", &policy()).unwrap_or_else(|_| panic!("compiles")).snapshot;
    assert_eq!(snapshot.rpc_rule_count(), 10_001);
    let guard = Guard::from_snapshot(snapshot, "prod").unwrap();
    let calls = [
        ("client", "/pkg42.Service3/Method37", "backend-42:50051", Verdict::Allowed),
        ("client", "/admin.Admin/Reset", "backend-7.prod.svc.cluster.local", Verdict::Allowed),
        ("client", "/admin.Admin/Reset", "BACKEND-7.Prod.Svc", Verdict::Allowed),
        ("client", "/pkg42.Service3/Method37", "10.0.42.1:50051", Verdict::Allowed),
        ("client", "/pkg42.Service3/Method37", "[::ffff:10.0.42.1]:50051", Verdict::Allowed),
        ("client", "/pkg42.Service3/Method37", "backend-43:50051", Verdict::Rejected),
        ("client", "/pkg42.Service3/Nope", "backend-42", Verdict::Rejected),
        ("client", "/pkg42.Service3/Method37", "nowhere.example.com:443", Verdict::Rejected),
        ("stranger", "/pkg42.Service3/Method37", "backend-42", Verdict::Allowed),
        // The wildcard through the pair's list, a cluster name, user info, a look-alike host.
        ("client", "/admin.Admin/Reset", "backend-7:50051", Verdict::Allowed),
        ("client", "/pkg42.Service3/Method37", "backend-42.prod.svc.cluster.local:50051", Verdict::Allowed),
        ("client", "/pkg42.Service3/Method37", "user@backend-42:50051", Verdict::Allowed),
        ("client", "/pkg42.Service3/Method37", "backend-42.evil.com:50051", Verdict::Rejected),
    ];
    // Warm up (thread-locals of arc-swap, lazily built state), and check the answers.
    for (service, rpc, authority, verdict) in calls {
        assert_eq!(guard.check(service, rpc, authority).verdict, verdict, "{service} {rpc} {authority}");
    }
    let made = allocations(|| {
        for _ in 0..1_000 {
            for (service, rpc, authority, _) in calls {
                let decision = guard.check(black_box(service), black_box(rpc), black_box(authority));
                black_box(decision.verdict);
                black_box(decision.rule());
            }
        }
    });
    assert_eq!(made, 0, "Guard::check allocated {made} times in {} checks", 1_000 * calls.len());
    // Pinned checks too.
    let pinned = guard.pin();
    let made = allocations(|| {
        for (service, rpc, authority, _) in calls {
            black_box(pinned.check(black_box(service), black_box(rpc), black_box(authority)).verdict);
        }
    });
    assert_eq!(made, 0);
}

/// The counter itself works: this test could fail.
#[test]
fn the_counter_sees_allocations() {
    let made = allocations(|| {
        black_box(vec![1u8; 64]);
        black_box(String::from("x").repeat(100));
    });
    assert!(made >= 2, "{made}");
}
