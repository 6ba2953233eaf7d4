//! What the kernel DNS redirect costs a real client (root): one `A` query at a time from a
//! process in a policed cgroup, straight to a local dnsmasq (the baseline: not port 53, so not
//! redirected), and to port 53 of `127.0.0.1` and of `::1`, which the kernel redirects to the
//! agent's DNS proxy (attribution by slot address for IPv4, by socket cookie and `sock_diag`
//! for IPv6), which answers from its cache (the same name every time: a hit) or forwards to the
//! same dnsmasq (a new name every time: a miss), and admits the answer into `DF_NAMES` either
//! way.
//!
//! usage: depfence-dns-bench [--rounds R] [--queries N] [--quick]
//!        depfence-dns-bench client <ip> <port> <n> [fresh]   (internal: the measuring client)
//!
//! Rounds interleave the three paths, so a noisy neighbour hits them alike; medians and p99
//! are over all samples, ratios are paired by round.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss,
    reason = "a benchmark binary: it fails loudly and prints its results"
)]

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use depfence::cgroup::{Cgroup2, cgroup_id, spawn_in};
use depfence::compile::compile_str;
use depfence::datapath::Datapath;
use depfence::datapath::abi::{CgroupState, Config, FLAG_DNS, MODE_ENFORCE, prog_names};
use depfence::dns::kernel::KernelDns;
use depfence::dns::{AllowChange, AllowSet, DnsPolicy, Proxy, ProxyConfig, TtlBounds};
use depfence_integration::dns::{Dnsmasq, require_dnsmasq};
use depfence_integration::fixture::{Cgroup, Pins};

const NAME: &str = "a.mirror.internal";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client(&args[2..]);
    }
    let (mut rounds, mut queries) = (7, 2_000);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--queries" => queries = it.next().and_then(|v| v.parse().ok()).expect("--queries N"),
            "--quick" => (rounds, queries) = (2, 200),
            other => {
                eprintln!("unknown argument {other}\nusage: depfence-dns-bench [--rounds R] [--queries N] [--quick]");
                return ExitCode::from(2);
            }
        }
    }
    if !depfence_integration::require_privileges("depfence-dns-bench") {
        return ExitCode::from(2);
    }
    let Some(dnsmasq) = require_dnsmasq("depfence-dns-bench") else { return ExitCode::from(2) };
    bench(&dnsmasq, rounds, queries);
    ExitCode::SUCCESS
}

/// A DNS query for `A name` with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The measuring client: `n` queries on one connected UDP socket, one at a time, each timed;
/// every answer must carry the query's id and `NOERROR` with one answer. `NAME` every time, or
/// with `fresh` a name never asked before (`<pid>-<id>.miss.mirror.internal`). Prints one
/// latency in ns per line.
fn client(args: &[String]) -> ExitCode {
    let server = SocketAddr::new(args[0].parse().unwrap(), args[1].parse().unwrap());
    let n: u16 = args[2].parse().unwrap();
    let fresh = args.get(3).is_some_and(|a| a == "fresh");
    let pid = std::process::id();
    let local: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
    let socket = UdpSocket::bind(local).unwrap();
    socket.connect(server).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = String::new();
    let mut buf = [0u8; 512];
    for id in 1..=n {
        let q = if fresh { query(id, &format!("p{pid}-{id}.miss.mirror.internal")) } else { query(id, NAME) };
        let start = Instant::now();
        socket.send(&q).unwrap();
        let len = socket.recv(&mut buf).unwrap();
        let took = start.elapsed();
        let answer = &buf[..len];
        assert_eq!(u16::from_be_bytes([answer[0], answer[1]]), id, "answer to another query");
        assert_eq!((answer[3] & 0x0f, answer[7]), (0, 1), "rcode and answer count for {server}");
        out.push_str(&format!("{}\n", took.as_nanos()));
    }
    print!("{out}");
    ExitCode::SUCCESS
}

fn run_client(cgroup: &Path, server: SocketAddr, fresh: bool, n: usize) -> Vec<u64> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["client", &server.ip().to_string(), &server.port().to_string(), &n.to_string()]).stdout(Stdio::piped());
    if fresh {
        cmd.arg("fresh");
    }
    let out = spawn_in(cgroup, &mut cmd).unwrap().wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "client to {server} failed: {text}");
    text.lines().map(|l| l.parse().unwrap()).collect()
}

fn median(samples: &[u64]) -> f64 {
    percentile(samples, 0.5)
}

fn percentile(samples: &[u64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn bench(dnsmasq: &Path, rounds: usize, queries: usize) {
    let upstream =
        Dnsmasq::start(dnsmasq, &format!("127.0.0.21 {NAME}\n"), 300, &["--address=/miss.mirror.internal/127.0.0.21"]);
    let mut top = Cgroup::new();
    let cgroup = top.child("client");
    let pins = Pins::new();
    let mut dp = Datapath::load(&pins.layout).unwrap();
    dp.attach(&cgroup, &prog_names::ALL).unwrap();

    // The service may resolve *.mirror.internal; its resolver's own address is allowed too, so
    // the direct path is an allowed connection, as it is for a service without host rules.
    let policy = format!(
        "version = 1\n[environments]\nprod = \"enforce\"\n[services.client]\nallow = [\n  \
         {{ host = \"*.mirror.internal\", ports = [443], proto = \"tcp\" }},\n  \
         {{ ip = \"{}\", ports = [{}], proto = \"udp\" }},\n]\n",
        upstream.addr.ip(),
        upstream.addr.port()
    );
    let snapshot = compile_str("bench.toml", &policy).map_err(|(_, d)| format!("{d:?}")).unwrap().snapshot;
    let (_, service) = snapshot.service("client").unwrap();
    let allows = depfence::lower::allows_from_snapshot(&service.rules(0).net_rules);
    dp.maps.install(&depfence::lower::compile(1, &allows).unwrap()).unwrap();
    let state =
        CgroupState { ruleset_id: 1, mode: MODE_ENFORCE, flags: FLAG_DNS, counter_slot: 0, ..Default::default() };
    dp.maps.set_cgroup(cgroup_id(&cgroup).unwrap(), state).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let kernel = Arc::new(KernelDns::open(&pins.layout).unwrap());
    kernel.set_services([("client", 0)]);
    let sink = Arc::clone(&kernel);
    let allow = Arc::new(AllowSet::new(TtlBounds::default(), 1024, move |change: &AllowChange| {
        sink.apply_change(change).unwrap();
    }));
    let proxy = runtime
        .block_on(Proxy::bind(
            ProxyConfig { upstreams: vec![upstream.addr], ..ProxyConfig::default() },
            DnsPolicy::from_snapshot(&snapshot, 0),
            Arc::clone(&kernel) as Arc<dyn depfence::dns::Attributor>,
            allow,
            |_| {},
        ))
        .unwrap();
    let own = Cgroup2::discover().unwrap().current().ok().and_then(|p| cgroup_id(&p).ok()).unwrap_or(0);
    dp.maps
        .set_config(Config { dns_proxy_port: u32::from(proxy.port()), dns_exempt_cgroup: own, ..Config::default() })
        .unwrap();

    let (v4, v6): (SocketAddr, SocketAddr) = ("127.0.0.1:53".parse().unwrap(), "[::1]:53".parse().unwrap());
    let paths: [(&str, SocketAddr, bool); 5] = [
        ("direct to dnsmasq (not redirected)", upstream.addr, false),
        ("127.0.0.1:53 → proxy, cache hit", v4, false),
        ("127.0.0.1:53 → proxy, cache miss", v4, true),
        ("[::1]:53 → proxy, cache hit", v6, false),
        ("[::1]:53 → proxy, cache miss", v6, true),
    ];
    // Warm-up, and a check that every path answers.
    for (_, server, fresh) in &paths {
        run_client(&cgroup, *server, *fresh, queries / 4 + 1);
    }
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); paths.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        let mut medians = vec![0.0; paths.len()];
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let s = run_client(&cgroup, paths[i].1, paths[i].2, queries);
            medians[i] = median(&s);
            samples[i].extend(s);
        }
        for i in 0..paths.len() {
            ratios[i].push(medians[i] / medians[0]);
        }
    }
    println!("{rounds} rounds × {queries} queries per path, one at a time, from a cgroup in enforce:");
    println!("{:<40} {:>10} {:>10} {:>18}", "path", "median µs", "p99 µs", "ratio to direct");
    for (i, (name, _, _)) in paths.iter().enumerate() {
        let mut r = ratios[i].clone();
        r.sort_by(f64::total_cmp);
        println!(
            "{name:<40} {:>10.1} {:>10.1} {:>8.2}× ({:.2}–{:.2})",
            median(&samples[i]),
            percentile(&samples[i], 0.99),
            r[r.len() / 2],
            r[0],
            r[r.len() - 1]
        );
    }
    let stats = proxy.cache_stats();
    println!("proxy cache: {} hits, {} misses, {} entries", stats.hits, stats.misses, stats.entries);
    let admitted = kernel.admitted();
    assert!(admitted >= 1, "the redirected answers were admitted into DF_NAMES");
    runtime.block_on(proxy.shutdown());
    drop(dp);
    drop(pins);
}
