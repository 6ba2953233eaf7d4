//! The in-process guard end to end: loading and reloading snapshot files, the file watch,
//! reloads under concurrent checks, and the tower layer in front of a real hyper client talking
//! to a real hyper server on loopback.

#![cfg(feature = "guard")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test helpers: a failing test should say where"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use depfence::compile::compile_str;
use depfence::guard::{CallError, Guard, GuardLayer, LoadError, Reason, Reloaded};
use depfence::snapshot::Snapshot;
use depfence::verdict::Verdict;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{Layer, Service};

/// checkout may charge on billing; its mode in `prod` is `mode`.
fn policy(mode: &str) -> String {
    format!(
        r#"version = 1
[environments]
prod = "audit"
[services.billing]
endpoints = [{{ ip = "127.0.0.1", proto = "tcp" }}]
[services.checkout]
mode = "{mode}"
allow = [{{ service = "billing" }}]
rpc_allow = [{{ service = "billing", rpcs = ["/billing.Billing/Charge", "/billing.Admin/*"] }}]
"#
    )
}

fn snapshot(text: &str) -> Snapshot {
    compile_str("guard.toml", text)
        .unwrap_or_else(|(s, d)| panic!("{:?}", d.iter().map(|d| d.to_plain(&s)).collect::<Vec<_>>()))
        .snapshot
}

/// Writes a snapshot the way a careful deployer does: a temporary file, then a rename.
fn install(path: &Path, snapshot: &Snapshot) {
    depfence::snapshot::write_file(path, &snapshot.to_bytes().unwrap()).unwrap();
}

#[test]
fn checks_say_which_rule_decided() {
    let guard = Guard::from_snapshot(snapshot(&policy("enforce")), "prod").unwrap();
    let d = guard.check("checkout", "/billing.Billing/Charge", "127.0.0.1:50051");
    assert_eq!(d.verdict, Verdict::Allowed);
    assert_eq!(d.rule().unwrap().pattern.to_string(), "/billing.Billing/Charge");
    assert_eq!(d.rule_position().unwrap(), "guard.toml:9:45");
    assert_eq!((d.caller(), d.backend()), (Some("checkout"), Some("billing")));
    let d = guard.check("checkout", "/billing.Admin/Reset", "127.0.0.1");
    assert_eq!(d.rule().unwrap().pattern.to_string(), "/billing.Admin/*");

    let d = guard.check("checkout", "/billing.Billing/Refund", "127.0.0.1:50051");
    assert_eq!(d.verdict, Verdict::Rejected);
    assert!(matches!(d.reason, Reason::NoRule { .. }));
    assert!(d.rule().is_none());
    assert_eq!(d.caller_position().unwrap(), "guard.toml:6:11");
    let d = guard.check("checkout", "/billing.Billing/Charge", "10.9.9.9:50051");
    assert!(matches!(d.reason, Reason::UnknownBackend { .. }));
    assert_eq!(d.verdict, Verdict::Rejected);
    assert_eq!(d.backend(), None);
}

/// A service is named by its name or a Kubernetes cluster name of it, and by nothing that
/// merely starts with its name: `billing.evil.com` is an unknown backend, so a call to it is
/// refused in enforce even though `billing`'s patterns would allow the RPC.
#[test]
fn service_names_are_exact_or_cluster_names() {
    let text = policy("enforce").replace(
        r#"endpoints = [{ ip = "127.0.0.1", proto = "tcp" }]"#,
        r#"endpoints = [{ ip = "127.0.0.1", proto = "tcp" }, { host = "billing.payments.example.org", ports = [443] }]"#,
    );
    let guard = Guard::from_snapshot(snapshot(&text), "prod").unwrap();
    let charge = |authority: &str| {
        let d = guard.check("checkout", "/billing.Billing/Charge", authority);
        (d.verdict, d.backend().map(str::to_owned))
    };
    let billing = (Verdict::Allowed, Some("billing".to_owned()));
    for authority in [
        "billing",
        "billing:50051",
        "Billing:50051",
        "billing.prod.svc:50051",
        "billing.prod.svc.cluster.local",
        "billing.prod.svc.cluster.local.:50051",
        "billing.payments.example.org:443",
    ] {
        assert_eq!(charge(authority), billing, "{authority}");
    }
    for authority in [
        "billing.evil.com",
        "billing.evil.com:50051",
        "billing.com:443",
        "billing.prod:50051",
        "billing.a.b.svc",
        "billing.prod.svc.example.org",
        "billing.payments.example.org:444",
        "billingx:50051",
    ] {
        let d = guard.check("checkout", "/billing.Billing/Charge", authority);
        assert_eq!(d.verdict, Verdict::Rejected, "{authority}");
        assert!(matches!(d.reason, Reason::UnknownBackend { .. }), "{authority}: {:?}", d.reason);
    }
}

#[test]
fn loading_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.snap");
    let error = Guard::from_file(&missing, "prod").unwrap_err();
    assert!(matches!(error, LoadError::Read { .. }));
    assert!(error.to_string().starts_with(&format!("cannot read snapshot `{}`: ", missing.display())), "{error}");

    let garbage = dir.path().join("garbage.snap");
    std::fs::write(&garbage, b"not a snapshot").unwrap();
    let error = Guard::from_file(&garbage, "prod").unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("invalid snapshot `{}`: not a depfence snapshot (bad magic bytes)", garbage.display())
    );

    let error = Guard::from_snapshot(snapshot(&policy("audit")), "staging").unwrap_err();
    assert_eq!(error.to_string(), "environment `staging` is not in the snapshot (it has `prod`)");

    let guard = Guard::from_snapshot(snapshot(&policy("audit")), "prod").unwrap();
    let error = GuardLayer::new(guard.clone(), "chekout").unwrap_err();
    assert_eq!(error.to_string(), "service `chekout` is not in the snapshot");
    assert!(matches!(guard.reload().unwrap_err(), LoadError::NoFile));
}

#[test]
fn reload_switches_audit_to_enforce_and_keeps_the_last_good_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guard.snap");
    let audit = snapshot(&policy("audit"));
    let enforce = snapshot(&policy("enforce"));
    install(&path, &audit);
    let guard = Guard::from_file(&path, "prod").unwrap();
    let refund = || guard.check("checkout", "/billing.Billing/Refund", "127.0.0.1:50051").verdict;
    assert_eq!(refund(), Verdict::WouldReject);
    assert_eq!(guard.generation(), 1);

    install(&path, &enforce);
    assert_eq!(guard.reload().unwrap(), Reloaded::Replaced { generation: 2, hash: enforce.hash() });
    assert_eq!(refund(), Verdict::Rejected);
    assert_eq!(guard.reload().unwrap(), Reloaded::Unchanged);

    // A damaged file, and a policy without the environment: refused, the enforce one stays.
    let mut bytes = audit.to_bytes().unwrap();
    let last = bytes.len() - 40;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    assert!(guard.reload().is_err());
    install(&path, &snapshot(&policy("audit").replace("prod = \"audit\"", "qa = \"audit\"")));
    let error = guard.reload().unwrap_err();
    assert_eq!(error.to_string(), "environment `prod` is not in the snapshot (it has `qa`)");
    assert_eq!(refund(), Verdict::Rejected);
    assert_eq!(guard.snapshot_hash(), enforce.hash());
}

/// Waits (up to 10 s) until a watching guard judges checkout's Refund `verdict`.
fn wait_for_refund(guard: &Guard, verdict: Verdict) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while guard.check("checkout", "/billing.Billing/Refund", "127.0.0.1").verdict != verdict {
        assert!(Instant::now() < deadline, "the watch did not reload to {verdict:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_watch_reloads_a_changed_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guard.snap");
    install(&path, &snapshot(&policy("audit")));
    let guard = Guard::from_file(&path, "prod").unwrap();
    let watcher = guard.watch(Duration::from_millis(10)).unwrap();
    install(&path, &snapshot(&policy("enforce")));
    wait_for_refund(&guard, Verdict::Rejected);
    // A half-written file is not applied; the complete one is, at a later poll.
    std::fs::write(&path, b"DEPFNCE\0\x02").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(guard.check("checkout", "/billing.Billing/Refund", "127.0.0.1").verdict, Verdict::Rejected);
    install(&path, &snapshot(&policy("audit")));
    wait_for_refund(&guard, Verdict::WouldReject);
    drop(watcher);
    // Stopped: later changes are not picked up.
    let generation = guard.generation();
    install(&path, &snapshot(&policy("enforce")));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guard.generation(), generation);
}

#[test]
fn the_watch_picks_up_a_change_made_before_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guard.snap");
    install(&path, &snapshot(&policy("audit")));
    let guard = Guard::from_file(&path, "prod").unwrap();
    // Changed after the load, before the watch: the watch's first look must not take the new
    // file for the one in force.
    install(&path, &snapshot(&policy("enforce")));
    let _watcher = guard.watch(Duration::from_millis(10)).unwrap();
    wait_for_refund(&guard, Verdict::Rejected);
    assert_eq!(guard.generation(), 2);
}

/// Two snapshots whose answers are correlated across two services: in `A` checkout may charge
/// and ledger may not, in `B` the reverse. Many threads check while another swaps A and B
/// thousands of times; every observation must fit exactly one snapshot, the one the decision
/// says decided.
#[test]
fn reloads_under_concurrent_checks_never_expose_a_torn_snapshot() {
    let text = |charger: &str, other: &str| {
        format!(
            r#"version = 1
[services.billing]
endpoints = [{{ ip = "10.0.0.5", ports = [50051] }}]
[services.{charger}]
mode = "enforce"
allow = [{{ service = "billing" }}]
rpc_allow = [{{ service = "billing", rpcs = ["/billing.Billing/Charge"] }}]
[services.{other}]
mode = "enforce"
allow = [{{ service = "billing" }}]
rpc_allow = [{{ service = "billing", rpcs = ["/billing.Billing/Refund"] }}]
"#
        )
    };
    let a = snapshot(&text("checkout", "ledger"));
    let b = snapshot(&text("ledger", "checkout"));
    assert_ne!(a.hash(), b.hash());
    let guard = Guard::from_snapshot(a.clone(), "default").unwrap();
    let done = AtomicBool::new(false);
    let seen = [AtomicUsize::new(0), AtomicUsize::new(0)];
    const SWAPS: usize = 5_000;
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let charge = "/billing.Billing/Charge";
                while !done.load(Ordering::Relaxed) {
                    // One check: the verdict must be the one of the snapshot that decided.
                    let d = guard.check("checkout", charge, "10.0.0.5:50051");
                    let in_a = d.snapshot().hash() == a.hash();
                    assert!(in_a || d.snapshot().hash() == b.hash());
                    assert_eq!(d.verdict == Verdict::Allowed, in_a, "checkout's answer fits the other snapshot");
                    if let Some(rule) = d.rule() {
                        assert_eq!(rule.pattern.to_string(), charge);
                    }
                    // Two checks on one pinned snapshot: exactly one service may charge.
                    let pinned = guard.pin();
                    let checkout = pinned.check("checkout", charge, "10.0.0.5:50051").verdict;
                    let ledger = pinned.check("ledger", charge, "10.0.0.5:50051").verdict;
                    let pinned_a = pinned.snapshot().hash() == a.hash();
                    assert_eq!(
                        (checkout, ledger),
                        if pinned_a {
                            (Verdict::Allowed, Verdict::Rejected)
                        } else {
                            (Verdict::Rejected, Verdict::Allowed)
                        }
                    );
                    seen[usize::from(!in_a)].fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        scope.spawn(|| {
            for i in 0..SWAPS {
                let next = if i % 2 == 0 { b.clone() } else { a.clone() };
                guard.replace(next).unwrap();
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            done.store(true, Ordering::Relaxed);
        });
    });
    assert_eq!(guard.generation(), 1 + SWAPS as u64);
    let (in_a, in_b) = (seen[0].load(Ordering::Relaxed), seen[1].load(Ordering::Relaxed));
    assert!(in_a > 0 && in_b > 0, "both snapshots must have been observed ({in_a} in A, {in_b} in B)");
}

// ---------------------------------------------------------------------------------------------
// The layer, with a real server.

/// A loopback server answering every request with 200 (and `grpc-status: 0` for gRPC); counts
/// the requests it saw.
async fn server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let grpc = request.headers().get("content-type").is_some_and(|v| v == "application/grpc");
                    let mut response = Response::builder().status(200);
                    if grpc {
                        response = response.header("content-type", "application/grpc").header("grpc-status", "0");
                    }
                    async move { Ok::<_, Infallible>(response.body(Full::new(Bytes::from("ok"))).unwrap()) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, seen)
}

fn request(addr: SocketAddr, path: &str, grpc: bool) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method("POST").uri(format!("http://{addr}{path}"));
    if grpc {
        builder = builder.header("content-type", "application/grpc");
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

/// `depfence_rpc_calls_total{service="checkout",backend="billing",verdict}` so far. The
/// debugging recorder's snapshots hold the increments since the last one, so they are summed
/// into `totals`.
fn counter(recorder: &DebuggingRecorder, totals: &mut std::collections::BTreeMap<String, u64>, verdict: &str) -> u64 {
    for (key, _, _, value) in recorder.snapshotter().snapshot().into_vec() {
        assert_eq!(key.key().name(), "depfence_rpc_calls_total");
        let labels: Vec<_> = key.key().labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        let DebugValue::Counter(n) = value else { panic!("{value:?}") };
        *totals.entry(labels.join(",")).or_default() += n;
    }
    totals.get(&format!("service=checkout,backend=billing,verdict={verdict}")).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_passes_audit_and_refuses_enforce() {
    let (addr, seen) = server().await;
    let guard = Guard::from_snapshot(snapshot(&policy("audit")), "prod").unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut service = GuardLayer::new(guard.clone(), "checkout").unwrap().layer(client);
    let recorder = DebuggingRecorder::new();
    let mut totals = std::collections::BTreeMap::new();

    // The counter is incremented in `call`, which runs inside the local recorder.
    let mut call = |request: Request<Full<Bytes>>| {
        metrics::with_local_recorder(&recorder, || {
            futures_ready(&mut service);
            service.call(request)
        })
    };

    // Audit: allowed and not-allowed calls both reach the server; both are counted.
    let ok = call(request(addr, "/billing.Billing/Charge", false)).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.into_body().collect().await.unwrap().to_bytes(), "ok");
    let audited = call(request(addr, "/billing.Billing/Refund", true)).await.unwrap();
    assert_eq!(audited.headers()["grpc-status"], "0", "audit passes the call through");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(counter(&recorder, &mut totals, "allowed"), 1);
    assert_eq!(counter(&recorder, &mut totals, "would_reject"), 1);

    // Enforce (a reload): the gRPC call gets PERMISSION_DENIED without leaving the process.
    guard.replace(snapshot(&policy("enforce"))).unwrap();
    let denied = call(request(addr, "/billing.Billing/Refund", true)).await.unwrap();
    assert_eq!(denied.status(), 200, "trailers-only gRPC response");
    assert_eq!(denied.headers()["content-type"], "application/grpc");
    assert_eq!(denied.headers()["grpc-status"], "7");
    let message = percent_encoding::percent_decode_str(denied.headers()["grpc-message"].to_str().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned();
    assert_eq!(
        message,
        format!(
            "depfence rejected rpc `/billing.Billing/Refund` from `checkout` to `{addr}` (service `billing`): no `rpc_allow` pattern of `checkout` for `billing` matches (environment `prod`, enforce; `checkout` is defined at guard.toml:6:11)"
        )
    );
    assert!(denied.into_body().collect().await.unwrap().to_bytes().is_empty());

    // A plain HTTP call fails with an error that says who, what, where and which policy line.
    let error = call(request(addr, "/billing.Billing/Refund", false)).await.unwrap_err();
    let CallError::Denied(denied) = &error else { panic!("{error:?}") };
    assert_eq!(
        (denied.service(), denied.rpc(), denied.backend()),
        ("checkout", "/billing.Billing/Refund", Some("billing"))
    );
    assert_eq!(denied.authority(), addr.to_string());
    assert_eq!(denied.position(), Some("guard.toml:6:11"));
    assert_eq!(error.to_string(), message);

    // An allowed call still goes through in enforce.
    let ok = call(request(addr, "/billing.Admin/Stats", false)).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(seen.load(Ordering::SeqCst), 3, "refused calls never reached the server");
    assert_eq!(counter(&recorder, &mut totals, "rejected"), 2);
    assert_eq!(counter(&recorder, &mut totals, "allowed"), 2);
}

/// Drives `poll_ready` once; the hyper client is always ready.
fn futures_ready<S: Service<Request<Full<Bytes>>>>(service: &mut S)
where
    S::Error: std::fmt::Debug,
{
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match service.poll_ready(&mut cx) {
        std::task::Poll::Ready(result) => result.unwrap(),
        std::task::Poll::Pending => panic!("the client is not ready"),
    }
}
