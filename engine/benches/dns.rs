//! The DNS proxy's added latency: one UDP query at a time from a connected socket, straight to a
//! local dnsmasq (the baseline) and through the proxy (attribution, name match, allow-set
//! admission, event), once answered from the proxy's cache (the same name every time: a hit)
//! and once forwarded upstream (a new name every time: a miss, through the pooled upstream
//! sockets), in alternating blocks of the same run. Prints median and p99 of each and their
//! ratio to the baseline; figures go to BENCHMARKS.md.
//!
//! `cargo bench -p depfence --features dns --bench dns` (add `-- --test` for a quick check).
//! Needs dnsmasq (Debian `dnsmasq-base`); without it, it says so and exits (fails under CI).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "bench"
)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use depfence::compile::compile_str;
use depfence::dns::{
    AllowSet, Attribution, DnsEvent, DnsPolicy, Proxy, ProxyConfig, StaticAttributor, TtlBounds, slot_addr,
};
use depfence_integration::dns::{Dnsmasq, require_dnsmasq};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// Times one query/answer round trip on a connected socket.
fn round_trip(socket: &UdpSocket, id: u16, name: &str, buf: &mut [u8]) -> Duration {
    let q = query(id, name);
    let t = Instant::now();
    socket.send(&q).unwrap();
    loop {
        let n = socket.recv(buf).unwrap();
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return t.elapsed();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let Some(dnsmasq) = require_dnsmasq("the dns bench") else { return };
    let dnsmasq =
        Dnsmasq::start(&dnsmasq, "10.0.0.10 a.mirror.internal\n", 300, &["--address=/miss.mirror.internal/10.0.0.10"]);
    let upstream = dnsmasq.addr;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let policy = {
        let text = "version = 1\n[environments]\nb = { mode = \"enforce\" }\n[services.web]\nallow = [ { host = \"*.mirror.internal\" } ]\n";
        DnsPolicy::from_snapshot(&compile_str("bench.toml", text).map_err(|_| "policy").unwrap().snapshot, 0)
    };
    let allow = Arc::new(AllowSet::new(TtlBounds::default(), 100_000, |_: &depfence::dns::AllowChange| {}));
    let attributor = Arc::new(StaticAttributor::new());
    let local = IpAddr::V4(slot_addr(7));
    attributor.insert(
        local,
        Attribution {
            service: Arc::from("web"),
            cgroup_id: 1,
            pid: 1,
            comm: "bench".into(),
            original_server: upstream,
        },
    );
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = Arc::clone(&events);
    let proxy = runtime
        .block_on(Proxy::bind(
            ProxyConfig { upstreams: vec![upstream], ..ProxyConfig::default() },
            policy,
            attributor,
            Arc::clone(&allow),
            move |_: DnsEvent| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            },
        ))
        .unwrap();
    let via_proxy = SocketAddr::new(local, proxy.port());

    let direct = UdpSocket::bind("127.0.0.1:0").unwrap();
    direct.connect(upstream).unwrap();
    direct.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let proxied = UdpSocket::bind("127.0.0.1:0").unwrap();
    proxied.connect(via_proxy).unwrap();
    proxied.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    let mut buf = [0u8; 1500];
    // dnsmasq up: retry the first query until it answers.
    let t = Instant::now();
    while direct.send(&query(1, "a.mirror.internal")).is_err() || direct.recv(&mut buf).is_err() {
        assert!(t.elapsed() < Duration::from_secs(5), "dnsmasq did not answer");
    }
    let (blocks, per_block, warmup) = if quick { (4, 25, 50) } else { (50, 200, 1000) };
    let mut id = 2u16;
    let mut fresh = 0u64;
    let mut miss_name = || {
        fresh += 1;
        format!("m{fresh}.miss.mirror.internal")
    };
    for _ in 0..warmup {
        id = id.wrapping_add(1);
        round_trip(&direct, id, "a.mirror.internal", &mut buf);
        round_trip(&proxied, id, "a.mirror.internal", &mut buf);
        round_trip(&proxied, id, &miss_name(), &mut buf);
    }
    let hits_before = proxy.cache_stats().hits;
    let (mut d, mut hit, mut miss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..blocks {
        for _ in 0..per_block {
            id = id.wrapping_add(1);
            d.push(round_trip(&direct, id, "a.mirror.internal", &mut buf));
        }
        for _ in 0..per_block {
            id = id.wrapping_add(1);
            hit.push(round_trip(&proxied, id, "a.mirror.internal", &mut buf));
        }
        for _ in 0..per_block {
            id = id.wrapping_add(1);
            miss.push(round_trip(&proxied, id, &miss_name(), &mut buf));
        }
    }
    let stats = proxy.cache_stats();
    assert_eq!(stats.hits - hits_before, hit.len() as u64, "every repeated name was a hit");
    for v in [&mut d, &mut hit, &mut miss] {
        v.sort_unstable();
    }
    let (dm, d99) = (percentile(&d, 0.5), percentile(&d, 0.99));
    println!("dns/udp A query, {} samples each", d.len());
    println!("  direct to dnsmasq:          median {dm:>9.1?}  p99 {d99:>9.1?}");
    for (what, p) in [("proxy, cache hit: ", &hit), ("proxy, cache miss:", &miss)] {
        let (pm, p99) = (percentile(p, 0.5), percentile(p, 0.99));
        println!(
            "  {what}          median {pm:>9.1?}  p99 {p99:>9.1?}  ratio to direct: median {:.2}x  p99 {:.2}x",
            pm.as_secs_f64() / dm.as_secs_f64(),
            p99.as_secs_f64() / d99.as_secs_f64(),
        );
    }
    let p = hit;
    assert_eq!(allow.live("web").len(), 1, "the answer entered the allow set");
    assert!(events.load(std::sync::atomic::Ordering::Relaxed) >= p.len() as u64);
    drop(proxy);
}
