//! Whole-connection cost of depfence on a real kernel (root): loopback TCP connect + close from
//! a process in a cgroup with no program, with depfence in audit and in enforce (allowed path),
//! at 10 and at 1,000,000 rules, and with the same rule sets in nftables (`socket cgroupv2`
//! match plus a set of `ip . port`), all in one run; plus the hot swap of a 1M-rule ruleset
//! (batched vs one update per rule) and the kernel memory per rule.
//!
//! usage: depfence-bench [--rounds R] [--connects N] [--quick]
//!        depfence-bench client <ip> <port> <n>     (internal: the measuring client)
//!
//! Rounds interleave the scenarios (each round runs every scenario once, in a rotated order),
//! so a noisy neighbour hits all of them alike; medians and p99 are over all samples.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    reason = "a benchmark binary: it fails loudly and prints its results"
)]

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use depfence::cgroup::{Cgroup2, spawn_in};
use depfence::datapath::Datapath;
use depfence::lower::{Allow, CompiledRuleset, compile};
use depfence_bpf_common::{CgroupState, IPPROTO_TCP, MODE_AUDIT, MODE_ENFORCE, map_names, prog_names};
use depfence_integration::fixture::{Cgroup, ECONNREFUSED, EPERM, LO4, Pins, probe};

/// The large rule set: the million rules.
const BIG: u32 = 1_000_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client(&args[2..]);
    }
    let mut rounds = 7;
    let mut connects = 2_000;
    let mut swaps = 3;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--connects" => connects = it.next().and_then(|v| v.parse().ok()).expect("--connects N"),
            "--quick" => (rounds, connects, swaps) = (2, 300, 1),
            other => {
                eprintln!("unknown argument {other}\nusage: depfence-bench [--rounds R] [--connects N] [--quick]");
                return ExitCode::from(2);
            }
        }
    }
    if !depfence_integration::require_privileges("depfence-bench") {
        return ExitCode::from(2);
    }
    bench(rounds, connects, swaps);
    ExitCode::SUCCESS
}

/// The measuring client: `n` × (socket, connect, close with RST so no TIME_WAIT piles up),
/// each timed; prints one latency in ns per line.
fn client(args: &[String]) -> ExitCode {
    let ip: IpAddr = args[0].parse().unwrap();
    let port: u16 = args[1].parse().unwrap();
    let n: usize = args[2].parse().unwrap();
    let dst = SocketAddr::new(ip, port);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = match TcpStream::connect(dst) {
            Ok(s) => s,
            Err(e) => {
                println!("error {}", e.raw_os_error().unwrap_or(-1));
                return ExitCode::FAILURE;
            }
        };
        linger_zero(&s);
        drop(s);
        out.push(t.elapsed().as_nanos());
    }
    let mut stdout = std::io::stdout().lock();
    for ns in out {
        writeln!(stdout, "{ns}").unwrap();
    }
    ExitCode::SUCCESS
}

/// SO_LINGER {on, 0}: close sends RST and leaves no TIME_WAIT socket behind.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a properly sized linger struct.
    #[allow(unsafe_code, reason = "setsockopt(2) for SO_LINGER has no stable std wrapper")]
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// A loopback server that accepts and closes.
fn server() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    port
}

/// `n` exact rules (127.1.x.y × 16 ports) plus the one that allows the server.
fn rules(ruleset: u32, n: u32, server_port: u16) -> (Vec<(Ipv4Addr, u16)>, CompiledRuleset) {
    let mut hosts: Vec<(Ipv4Addr, u16)> =
        (0..n - 1).map(|i| (Ipv4Addr::from(0x7f01_0000 | (i >> 4)), 10_000 + (i & 15) as u16)).collect();
    hosts.push((Ipv4Addr::LOCALHOST, server_port));
    let allows: Vec<Allow> = hosts
        .iter()
        .zip(1..)
        .map(|((a, p), id)| Allow::Host { addr: IpAddr::V4(*a), proto: IPPROTO_TCP, port: *p, rule_id: id })
        .collect();
    (hosts, compile(ruleset, &allows).unwrap())
}

struct Scenario {
    name: String,
    cgroup: std::path::PathBuf,
    samples: Vec<u64>,
    /// The median of each round, for ratios paired by round.
    round_medians: Vec<f64>,
    /// Kernel-accounted connect4 hook time and runs during this scenario's clients.
    hook_ns: u64,
    hook_runs: u64,
    /// Kernel-accounted time of every depfence hook (connect, sendmsg, sock_create, setsockopt,
    /// egress, …) during this scenario's clients, and its connections.
    all_hooks_ns: u64,
    connections: u64,
}

impl Scenario {
    fn new(name: impl Into<String>, cgroup: std::path::PathBuf) -> Self {
        let name = name.into();
        Self {
            name,
            cgroup,
            samples: Vec::new(),
            round_medians: Vec::new(),
            hook_ns: 0,
            hook_runs: 0,
            all_hooks_ns: 0,
            connections: 0,
        }
    }
}

fn run_client(cgroup: &Path, port: u16, n: usize) -> Vec<u64> {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["client", "127.0.0.1", &port.to_string(), &n.to_string()]).stdout(Stdio::piped());
    let child = spawn_in(cgroup, &mut cmd).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "client in {} failed: {text}", cgroup.display());
    text.lines().map(|l| l.parse().unwrap()).collect()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Kernel memory of a map as the kernel accounts it (`memlock` in its fdinfo).
fn map_memlock(pin: &Path) -> u64 {
    let data = aya::maps::MapData::from_pin(pin).unwrap();
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    depfence::datapath::status::fdinfo_field(&info, "memlock").unwrap().parse().unwrap()
}

/// One nftables set: its name, the cgroup it applies to, and its (address, port) elements.
type NftSet<'a> = (&'a str, &'a Path, &'a [(Ipv4Addr, u16)]);

/// nftables: the same rule sets, matched per packet on the output hook by the socket's cgroup.
struct Nft {
    table: String,
}

impl Nft {
    /// Loads the table; returns it with the time `nft -f` took.
    fn load(table: &str, sets: &[NftSet<'_>]) -> Option<(Self, Duration)> {
        let cg2 = Cgroup2::discover().unwrap();
        // nft resolves `socket cgroupv2` paths below /sys/fs/cgroup.
        let Ok(mount_rel) = cg2.mount().strip_prefix("/sys/fs/cgroup") else {
            println!("nftables: skipped, cgroup2 is not mounted below /sys/fs/cgroup");
            return None;
        };
        if Command::new("nft").arg("--version").output().is_err() {
            println!("nftables: skipped, `nft` is not installed");
            return None;
        }
        let mut text = format!("table inet {table} {{\n");
        for (name, _, hosts) in sets {
            text.push_str(&format!(
                "  set {name} {{ type ipv4_addr . inet_service; size {}; elements = {{ ",
                hosts.len().max(1) * 2
            ));
            for (i, (a, p)) in hosts.iter().enumerate() {
                if i > 0 {
                    text.push_str(", ");
                }
                text.push_str(&format!("{a} . {p}"));
            }
            text.push_str(" } }\n");
        }
        text.push_str("  chain out {\n    type filter hook output priority 0; policy accept;\n");
        for (name, cgroup, _) in sets {
            let rel = mount_rel.join(cg2.relative(cgroup).unwrap());
            let level = cg2.level(cgroup).unwrap();
            let m = format!("socket cgroupv2 level {level} \"{}\"", rel.display());
            text.push_str(&format!("    {m} ip daddr . tcp dport @{name} counter accept\n    {m} counter drop\n"));
        }
        text.push_str("  }\n}\n");
        let t = Instant::now();
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let status = child.wait().unwrap();
        let took = t.elapsed();
        assert!(status.success(), "nft -f failed");
        Some((Self { table: table.to_owned() }, took))
    }

    /// Packets counted by the accept and the drop rules, per rule, in order.
    fn counters(&self) -> Vec<u64> {
        let out = Command::new("nft").args(["list", "chain", "inet", &self.table, "out"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("packets ").skip(1).filter_map(|s| s.split_whitespace().next()?.parse().ok()).collect()
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let ok = Command::new("nft").args(["delete", "table", "inet", &self.table]).status().is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cleanup: could not delete nft table {}", self.table);
        }
    }
}

fn bench(rounds: usize, connects: usize, swaps: usize) {
    let port = server();
    let mut top = Cgroup::new();
    let pins = Pins::new();
    let mut dp = Datapath::load(&pins.layout).unwrap();
    let names = ["none", "depfence audit, 10 rules", "depfence enforce, 10 rules"];
    let names_big = ["depfence audit, 1M rules", "depfence enforce, 1M rules"];
    let mut scenarios: Vec<Scenario> = Vec::new();
    for (i, name) in names.iter().chain(&names_big).enumerate() {
        let cgroup = top.child(&format!("s{i}"));
        scenarios.push(Scenario::new(*name, cgroup));
    }
    let rules_before = map_memlock(&pins.layout.map(map_names::RULES));
    let (small_hosts, small) = rules(1, 10, port);
    let (big_hosts, big) = rules(2, BIG, port);
    dp.maps.install(&small).unwrap();
    let with_small = map_memlock(&pins.layout.map(map_names::RULES));
    dp.maps.install(&big).unwrap();
    let with_big = map_memlock(&pins.layout.map(map_names::RULES));
    let bytes_per_rule = (with_big - with_small) as f64 / f64::from(BIG);
    for (i, (ruleset, mode)) in
        [(1, MODE_AUDIT), (1, MODE_ENFORCE), (2, MODE_AUDIT), (2, MODE_ENFORCE)].into_iter().enumerate()
    {
        let cgroup = &scenarios[i + 1].cgroup;
        dp.attach(cgroup, &prog_names::ALL).unwrap();
        let id = depfence::cgroup::cgroup_id(cgroup).unwrap();
        let state = CgroupState { ruleset_id: ruleset, mode, counter_slot: i as u32 + 1, ..Default::default() };
        dp.maps.set_cgroup(id, state).unwrap();
    }
    // Sanity: the programs are really there (enforce refuses what the rules do not allow).
    for s in &scenarios[1..] {
        let denied = probe(&s.cgroup, "tcp", IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port, 1);
        // Nobody listens on 127.0.0.2: audit lets the SYN out and it is refused.
        let expect = if s.name.contains("enforce") { Err(EPERM) } else { Err(ECONNREFUSED) };
        assert_eq!(denied, expect, "{}", s.name);
    }
    let nft_small = top.child("nft-small");
    let nft_big = top.child("nft-big");
    let table = format!("depfence_bench_{}", std::process::id());
    let nft = Nft::load(&table, &[("allow_small", &nft_small, &small_hosts), ("allow_big", &nft_big, &big_hosts)]);
    if let Some((_, took)) = &nft {
        println!("nftables: loaded 10 + {BIG} set elements with `nft -f` in {took:.2?}");
        scenarios.push(Scenario::new("nftables, 10 rules", nft_small));
        scenarios.push(Scenario::new("nftables, 1M rules", nft_big));
    }

    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    for _ in 0..2 {
        run_client(&scenarios[0].cgroup, port, connects / 4 + 1); // warm-up
    }
    for round in 0..rounds {
        let n = scenarios.len();
        for k in 0..n {
            let s = &mut scenarios[(k + round) % n];
            let all_hooks = || -> u64 { prog_names::ALL.iter().map(|p| dp.prog_stats(p).unwrap().0).sum() };
            let (t0, c0) = dp.prog_stats(prog_names::CONNECT4).unwrap();
            let all0 = all_hooks();
            let mut samples = run_client(&s.cgroup, port, connects);
            let (t1, c1) = dp.prog_stats(prog_names::CONNECT4).unwrap();
            (s.hook_ns, s.hook_runs) = (s.hook_ns + t1 - t0, s.hook_runs + c1 - c0);
            s.all_hooks_ns += all_hooks() - all0;
            s.connections += samples.len() as u64;
            samples.sort_unstable();
            s.round_medians.push(percentile(&samples, 0.5));
            s.samples.extend(samples);
        }
    }
    drop(stats);
    if let Some((nft, _)) = &nft {
        let c = nft.counters();
        println!("nftables rule counters (accept, drop) × 2: {c:?}");
        assert!(c.len() == 4 && c[0] > 0 && c[2] > 0 && c[1] == 0 && c[3] == 0, "nft rules matched: {c:?}");
    }

    println!("\nloopback TCP connect + close, {rounds} rounds × {connects} connects per scenario, µs per connection");
    println!(
        "\n| scenario | median | p99 | median vs none | p99 vs none | paired ratio | connect4 hook | all hooks per connection |\n|---|---|---|---|---|---|---|---|"
    );
    let none_rounds = scenarios[0].round_medians.clone();
    let mut base = (0.0, 0.0);
    for (i, s) in scenarios.iter_mut().enumerate() {
        s.samples.sort_unstable();
        let (med, p99) = (percentile(&s.samples, 0.5), percentile(&s.samples, 0.99));
        if i == 0 {
            base = (med, p99);
        }
        let mut paired: Vec<f64> = s.round_medians.iter().zip(&none_rounds).map(|(m, n)| m / n).collect();
        paired.sort_unstable_by(f64::total_cmp);
        let paired = paired[paired.len() / 2];
        let hook = if s.hook_runs == 0 {
            "-".to_owned()
        } else {
            let ns = s.hook_ns as f64 / s.hook_runs as f64;
            format!("{ns:.0} ns ({:.2} % of none's median)", ns / (base.0 * 10.0))
        };
        let all = if s.hook_runs == 0 || s.connections == 0 {
            "-".to_owned()
        } else {
            let ns = s.all_hooks_ns as f64 / s.connections as f64;
            format!("{ns:.0} ns ({:.2} %)", ns / (base.0 * 10.0))
        };
        println!(
            "| {} | {med:.2} | {p99:.2} | {:.3}× | {:.3}× | {paired:.3}× | {hook} | {all} |",
            s.name,
            med / base.0,
            p99 / base.1
        );
    }
    println!(
        "\npaired ratio: the median over rounds of (this scenario's median / none's median in the same round). \
         connect4 hook: the kernel's own accounting of the hook's run time (BPF_ENABLE_STATS) per run. \
         all hooks: the same for every depfence program (connect, sock_create, egress per packet, …) \
         per connection."
    );
    println!(
        "DF_RULES kernel memory (fdinfo memlock): {rules_before} B empty, {with_small} B with 10 rules, \
         {with_big} B with 10 + {BIG}: {bytes_per_rule:.1} B per exact rule"
    );

    // Hot swap of the 1 Mi ruleset: batched (what depfence does) vs one update per rule.
    let cg = depfence::cgroup::cgroup_id(&scenarios[4].cgroup).unwrap();
    let st = |ruleset| CgroupState { ruleset_id: ruleset, mode: MODE_ENFORCE, counter_slot: 4, ..Default::default() };
    let (_, big3) = rules(3, BIG, port);
    println!("\nhot swap of a {BIG}-rule ruleset (install new, repoint, wait for readers, retire old):");
    let mut current = big;
    let mut current_id = 2;
    for i in 0..swaps {
        let (next, next_id) = if current_id == 2 { (big3.clone(), 3) } else { (rules(2, BIG, port).1, 2) };
        let r = dp.maps.hot_swap(&next, &[(cg, st(next_id))], Some(&current)).unwrap();
        println!(
            "  swap {i}: install {:.3?}, repoint {:.1?}, wait for readers {:.1?} → in force after {:.3?}; retire old {:.3?}",
            r.install,
            r.repoint,
            r.wait_for_readers,
            r.install + r.repoint,
            r.retire
        );
        assert_eq!(probe(&scenarios[4].cgroup, "tcp", LO4, port, 1), Ok(1));
        current = next;
        current_id = next_id;
    }
    // Baseline: the same install with one BPF_MAP_UPDATE_ELEM per rule.
    let (_, single) = rules(9, BIG, port);
    let t = Instant::now();
    for (k, v) in &single.exact {
        dp.maps.rules.insert(k, v, 0).unwrap();
    }
    let one_by_one = t.elapsed();
    let t = Instant::now();
    dp.maps.uninstall(&single).unwrap();
    let batched_delete = t.elapsed();
    println!("  baseline: one update per rule {one_by_one:.3?} (batched delete of the same {batched_delete:.3?})");
    drop(nft);
    drop(dp);
    drop(pins);
}
