//! The DNS proxy end to end, with real clients (dig, a Rust stub over UDP and TCP) against a
//! real upstream (dnsmasq) that each test starts on its own loopback address and port.
//!
//! No privileges are needed: the proxy binds `0.0.0.0:P` and `[::]:P` on `lo`, and queries go
//! to per-asker addresses `127.53.x.y:P` as the kernel redirect will send them. Tools missing:
//! the test prints why it skips, and fails under CI (`CI=true`); `scripts/setup` installs them
//! (Debian `dnsmasq-base`, `bind9-dnsutils`).

#![cfg(feature = "dns")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "tests: a failing test should say where"
)]

mod dns_support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use depfence::dns::{AllowChange, DenyResponse, DnsEvent, ProxyConfig, Transport, TtlBounds, slot_addr};
use depfence::verdict::Verdict;
use dns_support::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

const HOSTS: &str = "\
10.0.0.10 a.mirror.internal
fd00::10 a.mirror.internal
10.0.0.11 a.b.mirror.internal
10.0.0.66 evilmirror.internal
10.0.0.66 shared.mirror.internal
10.0.0.77 mirror.internal.evil
10.0.0.5 mirror.internal
10.1.0.1 e1.cdn.example
";

fn v4(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_answers_allowed_names_and_refuses_the_lookalikes() {
    let Some(tools) = Tools::require("enforce_answers_allowed_names_and_refuses_the_lookalikes", true) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &[]);
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce").await;
    let at = SocketAddr::new(slot_addr(7).into(), h.port());
    h.attribute(at.ip(), 4242, "deploy");

    // Allowed: answered, in the allow set, reported with the asker.
    let r = dig(&tools, at, "a.mirror.internal", "A", false);
    assert_eq!(r.status, "NOERROR");
    assert_eq!(r.addrs(), vec![v4("10.0.0.10")]);
    let r = dig(&tools, at, "A.B.Mirror.Internal.", "A", false);
    assert_eq!(r.addrs(), vec![v4("10.0.0.11")]);
    let live: Vec<IpAddr> = h.allow.live("web").into_iter().map(|(a, _)| a).collect();
    assert_eq!(live, vec![v4("10.0.0.10"), v4("10.0.0.11")]);

    // The lookalikes and the bare domain: REFUSED, not resolved, not in the set.
    for name in ["evilmirror.internal", "mirror.internal.evil", "mirror.internal"] {
        let r = dig(&tools, at, name, "A", false);
        assert_eq!(r.status, "REFUSED", "{name}: {}", r.raw);
        assert!(r.answers.is_empty(), "{name}");
    }
    assert_eq!(h.allow.live("web").len(), 2);

    // AAAA, over TCP too.
    let r = dig(&tools, at, "a.mirror.internal", "AAAA", true);
    assert_eq!(r.status, "NOERROR", "{}", r.raw);
    assert_eq!(r.addrs(), vec![v4("fd00::10")]);
    assert!(h.allow.live("web").iter().any(|(a, _)| *a == v4("fd00::10")));
    let r = dig(&tools, at, "evilmirror.internal", "A", true);
    assert_eq!(r.status, "REFUSED");

    let events = h.query_events();
    let summary: Vec<(String, Verdict, String, Transport)> =
        events.iter().map(|e| (e.name.clone(), e.verdict, e.rcode.clone(), e.transport)).collect();
    use Transport::{Tcp, Udp};
    use Verdict::{Allowed, Rejected};
    let expected = [
        ("a.mirror.internal", Allowed, "No Error", Udp),
        ("a.b.mirror.internal", Allowed, "No Error", Udp),
        ("evilmirror.internal", Rejected, "Query Refused", Udp),
        ("mirror.internal.evil", Rejected, "Query Refused", Udp),
        ("mirror.internal", Rejected, "Query Refused", Udp),
        ("a.mirror.internal", Allowed, "No Error", Tcp),
        ("evilmirror.internal", Rejected, "Query Refused", Tcp),
    ];
    let expected: Vec<_> = expected.iter().map(|(n, v, r, t)| (n.to_string(), *v, r.to_string(), *t)).collect();
    assert_eq!(summary, expected);
    for e in &events {
        assert_eq!((e.who.pid, e.who.comm.as_str(), &*e.who.service), (4242, "deploy", "web"));
    }
    assert_eq!(events[5].qtype, "AAAA");
    // The kernel sink saw one Added per address, before the answer left.
    let added = h.changes().iter().filter(|c| matches!(c, AllowChange::Added(_))).count();
    assert_eq!(added, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_can_be_the_deny_answer() {
    let Some(tools) = Tools::require("nxdomain_can_be_the_deny_answer", true) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &[]);
    let cfg = ProxyConfig { upstreams: vec![upstream.addr], deny: DenyResponse::NxDomain, ..config() };
    let h = Harness::start(cfg, "enforce").await;
    let at = SocketAddr::new(slot_addr(8).into(), h.port());
    h.attribute(at.ip(), 1, "x");
    assert_eq!(dig(&tools, at, "evilmirror.internal", "A", false).status, "NXDOMAIN");
    assert_eq!(dig(&tools, at, "a.mirror.internal", "A", false).status, "NOERROR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_answers_denied_names_and_reports_the_asker() {
    let Some(tools) = Tools::require("audit_answers_denied_names_and_reports_the_asker", true) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &[]);
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "audit").await;
    let at = SocketAddr::new(slot_addr(0x0102).into(), h.port());
    h.attribute(at.ip(), 31337, "pip");

    let r = dig(&tools, at, "evilmirror.internal", "A", false);
    assert_eq!((r.status.as_str(), r.addrs()), ("NOERROR", vec![v4("10.0.0.66")]));
    let r = dig(&tools, at, "mirror.internal.evil", "A", true);
    assert_eq!((r.status.as_str(), r.addrs()), ("NOERROR", vec![v4("10.0.0.77")]));
    // Denied names never enter the allow set, even in audit.
    assert!(h.allow.live("web").is_empty());
    let events = h.query_events();
    assert_eq!(events.len(), 2);
    for (e, name) in events.iter().zip(["evilmirror.internal", "mirror.internal.evil"]) {
        assert_eq!(e.verdict, Verdict::WouldReject);
        assert_eq!(e.name, name);
        assert_eq!((e.who.pid, e.who.comm.as_str()), (31337, "pip"));
    }
    assert_eq!(events[0].addrs, vec![v4("10.0.0.66")]);

    // The allowed name on the same address: admitted, and the conflict reported.
    let r = dig(&tools, at, "shared.mirror.internal", "A", false);
    assert_eq!(r.addrs(), vec![v4("10.0.0.66")]);
    let shared: Vec<_> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            DnsEvent::SharedAddress(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(
        (shared[0].addr, shared[0].allowed_name.as_str(), shared[0].denied_name.as_str()),
        (v4("10.0.0.66"), "shared.mirror.internal", "evilmirror.internal")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cname_chains_admit_the_final_addresses_for_the_asked_name() {
    let Some(tools) = Tools::require("cname_chains_admit_the_final_addresses_for_the_asked_name", true) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &["--cname=cdn.mirror.internal,e1.cdn.example"]);
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce").await;
    let at = SocketAddr::new(slot_addr(9).into(), h.port());
    h.attribute(at.ip(), 7, "apt");
    let r = dig(&tools, at, "cdn.mirror.internal", "A", false);
    assert_eq!(r.status, "NOERROR");
    assert!(r.answers.iter().any(|a| a.kind == "CNAME"), "{}", r.raw);
    assert_eq!(r.addrs(), vec![v4("10.1.0.1")]);
    assert_eq!(h.allow.live("web").into_iter().map(|(a, _)| a).collect::<Vec<_>>(), vec![v4("10.1.0.1")]);
    // The CNAME target itself is not an allowed name.
    assert_eq!(dig(&tools, at, "e1.cdn.example", "A", false).status, "REFUSED");
}

/// Replies leave from the address the query was sent to: a connected UDP socket (which drops
/// datagrams from any other source) gets them, for several 127.53.x.y addresses and for ::1.
/// This is what the `0.0.0.0:P` + `IP_PKTINFO` design rests on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_come_from_the_address_the_query_was_sent_to() {
    let Some(tools) = Tools::require("replies_come_from_the_address_the_query_was_sent_to", false) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &[]);
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce").await;
    for (i, local) in
        [slot_addr(1).into(), slot_addr(0xfffe).into(), v4("127.0.0.1"), v4("::1")].into_iter().enumerate()
    {
        h.attribute(local, 100 + i as u32, "c");
        let server = SocketAddr::new(local, h.port());
        let (rcode, addrs) = udp_query(server, "a.mirror.internal", RecordType::A).await;
        assert_eq!((rcode, addrs), (ResponseCode::NoError, vec![v4("10.0.0.10")]), "via {server}");
        let (rcode, _) = tcp_queries(server, &[("a.mirror.internal", RecordType::AAAA)]).await[0].clone();
        assert_eq!(rcode, ResponseCode::NoError, "tcp via {server}");
    }
    let pids: Vec<u32> = h.query_events().iter().map(|e| e.who.pid).collect();
    assert_eq!(pids, vec![100, 100, 101, 101, 102, 102, 103, 103]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_queries_on_one_tcp_connection() {
    let Some(tools) = Tools::require("several_queries_on_one_tcp_connection", false) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &[]);
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce").await;
    let at = SocketAddr::new(slot_addr(11).into(), h.port());
    h.attribute(at.ip(), 5, "git");
    let answers = tcp_queries(
        at,
        &[
            ("a.mirror.internal", RecordType::A),
            ("evilmirror.internal", RecordType::A),
            ("a.mirror.internal", RecordType::AAAA),
            ("a.b.mirror.internal", RecordType::A),
        ],
    )
    .await;
    assert_eq!(
        answers,
        vec![
            (ResponseCode::NoError, vec![v4("10.0.0.10")]),
            (ResponseCode::Refused, vec![]),
            (ResponseCode::NoError, vec![v4("fd00::10")]),
            (ResponseCode::NoError, vec![v4("10.0.0.11")]),
        ]
    );
    assert_eq!(h.query_events().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unattributed_queries_are_refused_and_reported() {
    let Some(tools) = Tools::require("unattributed_queries_are_refused_and_reported", false) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 300, &[]);
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce").await;
    let at = SocketAddr::new(slot_addr(12).into(), h.port());
    let (rcode, _) = udp_query(at, "a.mirror.internal", RecordType::A).await;
    assert_eq!(rcode, ResponseCode::Refused);
    assert!(h.allow.is_empty());
    let events = h.events();
    assert!(
        matches!(&events[..], [DnsEvent::Unattributed { forwarded: false, local, .. }] if *local == at),
        "{events:?}"
    );
}

/// An upstream that refuses (closed port: ICMP unreachable) and one that never answers
/// (a bound socket that reads nothing): SERVFAIL, promptly, over UDP and TCP, never silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_gives_a_prompt_servfail() {
    let Some(tools) = Tools::require("a_dead_upstream_gives_a_prompt_servfail", true) else { return };
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let timeout = Duration::from_millis(300);
    for (what, upstreams, bound) in [
        ("closed port", vec![closed], Duration::from_millis(100)),
        ("silent server", vec![blackhole.local_addr().unwrap()], Duration::from_millis(500)),
        ("closed then silent", vec![closed, blackhole.local_addr().unwrap()], Duration::from_millis(500)),
    ] {
        let h = Harness::start(ProxyConfig { upstreams, upstream_timeout: timeout, ..config() }, "enforce").await;
        let at = SocketAddr::new(slot_addr(13).into(), h.port());
        h.attribute(at.ip(), 9, "curl");
        let t = Instant::now();
        let (rcode, _) = udp_query(at, "a.mirror.internal", RecordType::A).await;
        let udp_took = t.elapsed();
        assert_eq!(rcode, ResponseCode::ServFail, "{what}");
        assert!(udp_took < bound, "{what}: SERVFAIL after {udp_took:?} (bound {bound:?})");
        let t = Instant::now();
        let r = dig(&tools, at, "a.b.mirror.internal", "A", true);
        assert_eq!(r.status, "SERVFAIL", "{what}");
        assert!(t.elapsed() < bound + Duration::from_millis(400), "{what}: dig +tcp took {:?}", t.elapsed());
        let events = h.query_events();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.upstream_error.is_some() && e.rcode == "Server Failure"), "{events:?}");
        eprintln!("{what}: SERVFAIL over UDP after {udp_took:?}");
    }
}

/// TTLs: the answer's TTL is lowered to the cap, the entry lives for the cap, and leaves the set
/// (with a Removed change) when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_leave_the_allow_set_when_their_ttl_expires() {
    let Some(tools) = Tools::require("answers_leave_the_allow_set_when_their_ttl_expires", true) else { return };
    let upstream = Dnsmasq::start(&tools.dnsmasq, HOSTS, 600, &[]);
    let ttl = TtlBounds { floor: Duration::from_millis(500), cap: Duration::from_secs(2) };
    let h = Harness::start_with(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "enforce", ttl).await;
    let at = SocketAddr::new(slot_addr(14).into(), h.port());
    h.attribute(at.ip(), 77, "cron");
    let t0 = Instant::now();
    let r = dig(&tools, at, "a.mirror.internal", "A", false);
    assert_eq!(r.answers[0].ttl, 2, "TTL 600 capped to 2: {}", r.raw);
    assert_eq!(h.allow.live("web").len(), 1);
    let removed_at = poll(Duration::from_secs(5), || h.allow.is_empty()).expect("the entry never expired");
    let lived = removed_at - t0;
    assert!(lived >= Duration::from_millis(1900) && lived < Duration::from_millis(3000), "lived {lived:?}");
    let changes = h.changes();
    assert!(
        matches!(&changes[..], [AllowChange::Added(a), AllowChange::Removed(b)] if a == b && a.addr == v4("10.0.0.10"))
    );
}

/// Many askers at once, each at its own 127.53.x.y and with its own fake pid, asking names that
/// say who they are: every event carries the pid of the asker of its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_askers_are_never_mixed_up() {
    let Some(tools) = Tools::require("concurrent_askers_are_never_mixed_up", false) else { return };
    let upstream = Dnsmasq::start(
        &tools.dnsmasq,
        HOSTS,
        300,
        &["--address=/wild.mirror.internal/10.0.0.50", "--address=/wild.evil/10.0.0.51"],
    );
    let h = Harness::start(ProxyConfig { upstreams: vec![upstream.addr], ..config() }, "audit").await;
    const ASKERS: u16 = 64;
    const QUERIES: usize = 20;
    for i in 0..ASKERS {
        h.attribute(slot_addr(0x0100 + i).into(), 10_000 + u32::from(i), &format!("w{i}"));
    }
    let port = h.port();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ASKERS {
        tasks.spawn(async move {
            let at = SocketAddr::new(slot_addr(0x0100 + i).into(), port);
            for k in 0..QUERIES {
                let domain = if k % 2 == 0 { "wild.mirror.internal" } else { "wild.evil" };
                let name = format!("c{i}-{k}.{domain}");
                if k % 5 == 4 {
                    let r = tcp_queries(at, &[(name.as_str(), RecordType::A)]).await;
                    assert_eq!(r[0].0, ResponseCode::NoError);
                } else {
                    let (rcode, addrs) = udp_query(at, &name, RecordType::A).await;
                    assert_eq!(rcode, ResponseCode::NoError, "{name}");
                    assert_eq!(addrs.len(), 1, "{name}");
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let events = h.query_events();
    assert_eq!(events.len(), usize::from(ASKERS) * QUERIES);
    for e in &events {
        let asker: u32 = e.name.strip_prefix('c').and_then(|r| r.split('-').next()).unwrap().parse().unwrap();
        assert_eq!(e.who.pid, 10_000 + asker, "{} answered for pid {}", e.name, e.who.pid);
        assert_eq!(e.who.comm, format!("w{asker}"));
        let expected = if e.name.ends_with(".wild.evil") { Verdict::WouldReject } else { Verdict::Allowed };
        assert_eq!(e.verdict, expected, "{}", e.name);
    }
}
