//! Privileged tests: real cgroups, real BPF, real sockets on loopback.
//! Run as root: `cargo test -p depfence-integration --test kernel`. Without root every test
//! prints why it skipped; under CI (`CI=true`) a skip is a failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests fail by panicking"
)]

use std::{
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use depfence::cgroup::{Cgroup2, cgroup_id};
use depfence::datapath::{Adopted, Datapath};
use depfence::lower::{Allow, allows_from_snapshot, compile};
use depfence_bpf_common::{
    CgroupState, Config, FLAG_ACTIVE_HAS_CIDR, GLOBAL_EVENTS_DEDUPED, GLOBAL_EVENTS_DROPPED, IPPROTO_TCP, IPPROTO_UDP,
    MODE_AUDIT, MODE_ENFORCE, VERDICT_ALLOWED, VERDICT_CANDIDATE_WOULD_REJECT, VERDICT_REJECTED, VERDICT_WOULD_REJECT,
    prog_names, user::words_addr,
};
use depfence_integration::fixture::{
    Cgroup, ECONNREFUSED, EPERM, LO4, LO6, Pins, attached, enforce, probe, probe_until, state, tcp_listener,
    udp_receiver,
};

fn cgroup_level(dir: &Path) -> io::Result<u32> {
    Cgroup2::discover().and_then(|c| c.level(dir)).map_err(io::Error::other)
}

fn privileged() -> bool {
    depfence_integration::require_privileges("kernel test")
}

#[test]
fn enforce_audit_v4_v6_udp() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);

    let allowed4 = tcp_listener(LO4);
    let denied4 = tcp_listener(LO4);
    let allowed6 = tcp_listener(LO6);
    let denied6 = tcp_listener(LO6);
    let (udp_ok, udp_ok_port) = udp_receiver(LO4);
    let (_udp_no, udp_no_port) = udp_receiver(LO4);
    let (udp6_ok, udp6_ok_port) = udp_receiver(LO6);
    let (_udp6_no, udp6_no_port) = udp_receiver(LO6);

    let slot = 7;
    enforce(
        &mut dp,
        cg.id(),
        slot,
        &[
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: allowed4, rule_id: 11 },
            Allow::Host { addr: LO6, proto: IPPROTO_TCP, port: allowed6, rule_id: 12 },
            Allow::Host { addr: LO4, proto: IPPROTO_UDP, port: udp_ok_port, rule_id: 13 },
            Allow::Host { addr: LO6, proto: IPPROTO_UDP, port: udp6_ok_port, rule_id: 14 },
        ],
    );
    let c = |dp: &Datapath, v| dp.maps.counter(slot, v).unwrap();

    // enforce: allowed destinations pass, others get EPERM.
    assert_eq!(probe(&cg.path, "tcp", LO4, allowed4, 1), Ok(1));
    assert_eq!(probe(&cg.path, "tcp", LO4, denied4, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tcp", LO6, allowed6, 1), Ok(1));
    assert_eq!(probe(&cg.path, "tcp", LO6, denied6, 1), Err(EPERM));
    // IPv4-mapped IPv6 (connect6 on an AF_INET6 socket) matches the IPv4 rule.
    let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
    assert_eq!(probe(&cg.path, "tcp", mapped, allowed4, 1), Ok(1));
    assert_eq!(probe(&cg.path, "tcp", mapped, denied4, 1), Err(EPERM));
    // unconnected UDP sendto (sendmsg4/6).
    assert_eq!(probe(&cg.path, "udp", LO4, udp_ok_port, 1), Ok(1));
    assert_eq!(probe(&cg.path, "udp", LO4, udp_no_port, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "udp", LO6, udp6_ok_port, 1), Ok(1));
    assert_eq!(probe(&cg.path, "udp", LO6, udp6_no_port, 1), Err(EPERM));
    let mut buf = [0u8; 16];
    udp_ok.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(udp_ok.recv(&mut buf).unwrap(), 8, "allowed datagram arrives");
    udp6_ok.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(udp6_ok.recv(&mut buf).unwrap(), 8);
    assert_eq!(c(&dp, VERDICT_ALLOWED), 5);
    assert_eq!(c(&dp, VERDICT_REJECTED), 5);
    assert_eq!(c(&dp, VERDICT_WOULD_REJECT), 0);

    let events = dp.maps.drain_events();
    assert_eq!(events.len(), 5, "one event per rejection: {events:?}");
    let e = events[0];
    assert_eq!(
        (e.verdict, e.port, e.proto, e.cgroup_id, e.policy_cgroup_id),
        (VERDICT_REJECTED, denied4, IPPROTO_TCP, cg.id(), cg.id())
    );
    assert_eq!(words_addr(e.addr), LO4);
    assert_eq!(&e.comm[..14], b"depfence-probe");
    eprintln!("event[0]: {e:?}");

    // audit: everything passes; would_reject increments by exactly 1 per miss.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, slot)).unwrap();
    let before = c(&dp, VERDICT_WOULD_REJECT);
    assert_eq!(probe(&cg.path, "tcp", LO4, denied4, 1), Ok(1));
    assert_eq!(c(&dp, VERDICT_WOULD_REJECT), before + 1);
    assert_eq!(probe(&cg.path, "tcp", LO4, allowed4, 1), Ok(1));
    assert_eq!(c(&dp, VERDICT_WOULD_REJECT), before + 1);
    assert_eq!(probe(&cg.path, "udp", LO6, udp6_no_port, 1), Ok(1));
    assert_eq!(c(&dp, VERDICT_WOULD_REJECT), before + 2);
    assert_eq!(c(&dp, VERDICT_REJECTED), 5, "audit never rejects");
    let ev: Vec<_> = dp.maps.drain_events().into_iter().map(|e| e.verdict).collect();
    assert_eq!(ev, [VERDICT_WOULD_REJECT, VERDICT_WOULD_REJECT]);
    assert_eq!(dp.maps.global(GLOBAL_EVENTS_DROPPED).unwrap(), 0);
    drop(dp);
}

/// Every allowed connect (and UDP datagram) counts one hit of the rule that allowed it, exactly,
/// in `DF_RULE_HITS` under (ruleset, rule id); refusals and unexercised rules count nothing; a
/// retired ruleset's hits are read and deleted together.
#[test]
fn rule_hits_are_counted_per_rule_exactly() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let (a, b, block, unused, denied) =
        (tcp_listener(LO4), tcp_listener(LO4), tcp_listener(Ipv4Addr::new(127, 0, 0, 2).into()), 1, tcp_listener(LO4));
    let (_udp, udp_port) = udp_receiver(LO4);
    enforce(
        &mut dp,
        cg.id(),
        3,
        &[
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: a, rule_id: 1 },
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: b, rule_id: 2 },
            Allow::Cidr {
                addr: Ipv4Addr::new(127, 0, 0, 0).into(),
                prefix: 24,
                proto: IPPROTO_TCP,
                ports: (block, block),
                rule_id: 3,
            },
            Allow::Host { addr: LO4, proto: IPPROTO_UDP, port: udp_port, rule_id: 4 },
            Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: unused, rule_id: 5 },
        ],
    );
    dp.maps.set_cgroup(cg.id(), CgroupState { flags: FLAG_ACTIVE_HAS_CIDR, ..state(1, MODE_ENFORCE, 3) }).unwrap();
    assert_eq!(probe(&cg.path, "tcp", LO4, a, 7), Ok(7));
    assert_eq!(probe(&cg.path, "tcp", LO4, b, 3), Ok(3));
    assert_eq!(probe(&cg.path, "tcp", Ipv4Addr::new(127, 0, 0, 2).into(), block, 2), Ok(2));
    assert_eq!(probe(&cg.path, "udp", LO4, udp_port, 4), Ok(4));
    assert_eq!(probe(&cg.path, "tcp", LO4, denied, 2), Err(EPERM));
    let hits: Vec<(u32, u32, u64)> =
        dp.maps.rule_hits().unwrap().into_iter().map(|(k, n)| (k.ruleset, k.rule_id, n)).collect();
    assert_eq!(hits, [(1, 1, 7), (1, 2, 3), (1, 3, 2), (1, 4, 4)]);
    assert_eq!(dp.maps.counter(3, VERDICT_ALLOWED).unwrap(), 16, "every allowed call is one hit");
    // Audit: a would-reject is no hit; an allowed connect still is.
    dp.maps.set_cgroup(cg.id(), CgroupState { flags: FLAG_ACTIVE_HAS_CIDR, ..state(1, MODE_AUDIT, 3) }).unwrap();
    assert_eq!(probe(&cg.path, "tcp", LO4, denied, 1), Ok(1));
    assert_eq!(probe(&cg.path, "tcp", LO4, a, 1), Ok(1));
    let mut taken = dp.maps.take_rule_hits(1).unwrap();
    taken.sort_unstable();
    assert_eq!(taken, [(1, 8), (2, 3), (3, 2), (4, 4)]);
    assert!(dp.maps.rule_hits().unwrap().is_empty(), "taken hits are deleted");
    assert_eq!(dp.maps.global(depfence_bpf_common::GLOBAL_RULE_HITS_DROPPED).unwrap(), 0);
}

#[test]
fn nested_cgroup_uses_nearest_registered_ancestor() {
    if !privileged() {
        return;
    }
    let mut cg = Cgroup::new();
    let leaf_parent = cg.child("a");
    let leaf = cg.child("a/b");
    let pins = Pins::new();
    // Attached at the top; programs are inherited by descendants.
    let mut dp = attached(&cg, &pins);
    let ok = tcp_listener(LO4);
    let no = tcp_listener(LO4);
    dp.maps
        .install(&compile(1, &[Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: ok, rule_id: 1 }]).unwrap())
        .unwrap();
    dp.maps
        .install(&compile(2, &[Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: no, rule_id: 2 }]).unwrap())
        .unwrap();
    // Only the top is registered: a/b inherits it through the ancestor walk.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_ENFORCE, 1)).unwrap();
    assert_eq!(probe(&leaf, "tcp", LO4, ok, 1), Ok(1));
    assert_eq!(probe(&leaf, "tcp", LO4, no, 1), Err(EPERM));
    let e = dp.maps.drain_events();
    assert_eq!((e[0].cgroup_id, e[0].policy_cgroup_id), (cgroup_id(&leaf).unwrap(), cg.id()));
    // Register the middle one: it is nearer, so it wins.
    dp.maps.set_cgroup(cgroup_id(&leaf_parent).unwrap(), state(2, MODE_ENFORCE, 2)).unwrap();
    assert_eq!(probe(&leaf, "tcp", LO4, ok, 1), Err(EPERM));
    assert_eq!(probe(&leaf, "tcp", LO4, no, 1), Ok(1));
    assert_eq!(dp.maps.counter(2, VERDICT_REJECTED).unwrap(), 1);
    assert_eq!(dp.maps.counter(1, VERDICT_REJECTED).unwrap(), 1);
    drop(dp);
}

#[test]
fn pins_adopt_hot_swap_candidate_cidr() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let a = tcp_listener(LO4);
    let b = tcp_listener(LO4);
    let c6 = tcp_listener(LO6);
    {
        let mut dp = Datapath::load(&pins.layout).unwrap();
        let links = dp.attach(&cg.path, &prog_names::ALL).unwrap();
        assert_eq!(links.len(), prog_names::ALL.len());
        dp.maps
            .install(&compile(1, &[Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: a, rule_id: 1 }]).unwrap())
            .unwrap();
        dp.maps.set_cgroup(cg.id(), state(1, MODE_ENFORCE, 3)).unwrap();
        assert_eq!(probe(&cg.path, "tcp", LO4, b, 1), Err(EPERM));
    } // the loader instance is gone: object, program fds and map fds closed

    // Enforcement survives through the pinned links + maps.
    assert_eq!(probe(&cg.path, "tcp", LO4, b, 1), Err(EPERM));
    assert_eq!(probe(&cg.path, "tcp", LO4, a, 1), Ok(1));

    // A second instance adopts from pins (no object load).
    let mut ad = Adopted::open(&pins.layout).unwrap_or_else(|e| panic!("adopt: {e:?}"));
    assert_eq!(ad.links.len(), prog_names::ALL.len());
    assert_eq!(ad.maps.counter(3, VERDICT_REJECTED).unwrap(), 2, "counters kept across loaders");

    // Shadow: candidate ruleset 2 allows only b → connecting to a is allowed (active) but
    // counted as candidate_would_reject.
    ad.maps
        .install(&compile(2, &[Allow::Host { addr: LO4, proto: IPPROTO_TCP, port: b, rule_id: 2 }]).unwrap())
        .unwrap();
    ad.maps.set_cgroup(cg.id(), CgroupState { candidate_ruleset: 2, ..state(1, MODE_ENFORCE, 3) }).unwrap();
    assert_eq!(probe(&cg.path, "tcp", LO4, a, 1), Ok(1));
    assert_eq!(ad.maps.counter(3, VERDICT_CANDIDATE_WOULD_REJECT).unwrap(), 1);

    // Hot swap: write generation 3 completely (a CIDR: 127.0.0.0/8 tcp any port, and ::1/128
    // tcp port c6 only), then repoint the cgroup with ONE update, then free generation 1.
    let g3 = compile(
        3,
        &[
            Allow::Cidr { addr: LO4, prefix: 8, proto: IPPROTO_TCP, ports: (1, 65535), rule_id: 30 },
            Allow::Cidr { addr: LO6, prefix: 128, proto: IPPROTO_TCP, ports: (c6, c6), rule_id: 31 },
        ],
    )
    .unwrap();
    ad.maps.install(&g3).unwrap();
    let t = Instant::now();
    ad.maps.set_cgroup(cg.id(), CgroupState { flags: FLAG_ACTIVE_HAS_CIDR, ..state(3, MODE_ENFORCE, 3) }).unwrap();
    eprintln!("hot swap: one cgroup update took {:?}", t.elapsed());
    let freed = ad.maps.remove_ruleset(1).unwrap() + ad.maps.remove_ruleset(2).unwrap();
    assert_eq!(freed, 2);
    assert_eq!(probe(&cg.path, "tcp", LO4, b, 1), Ok(1), "CIDR now allows b");
    // 127.0.0.2 is inside 127.0.0.0/8: the hook allows it, the kernel then answers RST
    // (nobody listens there): ECONNREFUSED, not EPERM.
    assert_eq!(probe(&cg.path, "tcp", IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), a, 1), Err(ECONNREFUSED));
    assert_eq!(probe(&cg.path, "tcp", LO6, c6, 1), Ok(1));
    let other6 = tcp_listener(LO6);
    assert_eq!(probe(&cg.path, "tcp", LO6, other6, 1), Err(EPERM), "port range respected");
    drop(ad);
    drop(pins); // unpin links (detach) and maps
    // Detached: the program no longer runs for this cgroup.
    assert_eq!(probe_until(&cg.path, "tcp", LO6, other6, Ok(1)), Ok(1));
}

/// ns per hook invocation from the kernel's own accounting (BPF_ENABLE_STATS).
#[test]
fn hook_cost_and_event_dedup() {
    if !privileged() {
        return;
    }
    let n: u64 = std::env::var("DEPFENCE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
    let mut cg = Cgroup::new();
    cg.child("x");
    cg.child("x/y");
    let nested = cg.child("x/y/z");
    let base_cg = Cgroup::new();
    let two_cg = Cgroup::new();
    let storage_cg = Cgroup::new();
    let cgid_cg = Cgroup::new();
    let cghash_cg = Cgroup::new();
    let empty_cg = Cgroup::new();
    let cgstate_cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = Datapath::load(&pins.layout).unwrap();
    dp.attach(&cg.path, &[prog_names::CONNECT4]).unwrap();
    dp.attach(&base_cg.path, &[prog_names::BASELINE4]).unwrap();
    dp.attach(&two_cg.path, &[prog_names::BENCH_2LOOKUPS]).unwrap();
    dp.attach(&storage_cg.path, &[prog_names::BENCH_STORAGE]).unwrap();
    dp.attach(&cgid_cg.path, &[prog_names::BENCH_CGID]).unwrap();
    dp.attach(&cghash_cg.path, &[prog_names::BENCH_CGHASH]).unwrap();
    dp.attach(&empty_cg.path, &[prog_names::BENCH_EMPTY]).unwrap();
    dp.attach(&cgstate_cg.path, &[prog_names::BENCH_CGSTATE]).unwrap();
    dp.maps.set_cgroup(cgstate_cg.id(), state(1, MODE_ENFORCE, 4)).unwrap();
    dp.maps.set_cgroup(two_cg.id(), state(1, MODE_ENFORCE, 2)).unwrap();
    {
        let m = dp.ebpf_mut().map_mut("DF_BENCH_POLICY").unwrap();
        let mut policy: aya::maps::Array<&mut aya::maps::MapData, CgroupState> = aya::maps::Array::try_from(m).unwrap();
        policy.set(0, state(1, MODE_ENFORCE, 3), 0).unwrap();
    }
    let port = 9; // UDP connect() sends nothing
    dp.maps.install(&compile(1, &[Allow::Host { addr: LO4, proto: IPPROTO_UDP, port, rule_id: 1 }]).unwrap()).unwrap();
    dp.maps
        .install(&compile(2, &[Allow::Cidr { addr: LO4, prefix: 8, proto: 0, ports: (1, 65535), rule_id: 2 }]).unwrap())
        .unwrap();

    let run = |dp: &Datapath, label: &str, cgroup: &Path, prog: &'static str, ip: IpAddr| {
        let (t0, c0) = dp.prog_stats(prog).unwrap();
        let r = probe(cgroup, "udpconnect", ip, port, n);
        let (t1, c1) = dp.prog_stats(prog).unwrap();
        let (dt, dc) = (t1 - t0, c1 - c0);
        let ns = dt as f64 / dc.max(1) as f64;
        eprintln!("bench {label:<44} {ns:7.1} ns/hook  (run_cnt {dc}, probe {r:?})");
        ns
    };
    // 1. baseline: exact lookup + per-CPU counter (the minimum hook).
    let base = run(&dp, "baseline (1 hash lookup + 1 counter)", &base_cg.path, prog_names::BASELINE4, LO4);
    let two = run(&dp, "bench: cgroup hash + rule hash + counter", &two_cg.path, prog_names::BENCH_2LOOKUPS, LO4);
    let stor =
        run(&dp, "bench: cgroup storage + array + rule + counter", &storage_cg.path, prog_names::BENCH_STORAGE, LO4);
    eprintln!("ratios vs baseline: 2 lookups {:.2}x, storage {:.2}x", two / base, stor / base);
    run(&dp, "bench: empty program", &empty_cg.path, prog_names::BENCH_EMPTY, LO4);
    run(&dp, "bench: cgroup id → DF_CGROUPS hit + counter", &cgstate_cg.path, prog_names::BENCH_CGSTATE, LO4);
    run(&dp, "bench: get_current_cgroup_id + counter", &cgid_cg.path, prog_names::BENCH_CGID, LO4);
    dp.maps.set_config(Config { dedup_window_ns: two_cg.id(), ..Config::default() }).unwrap();
    run(&dp, "bench: u64 hash hit (DF_CGROUPS) + counter", &cghash_cg.path, prog_names::BENCH_CGHASH, LO4);
    dp.maps.set_config(Config::default()).unwrap();
    // 2. full hook, registered cgroup, exact hit (allowed).
    dp.maps.set_cgroup(cg.id(), state(1, MODE_ENFORCE, 1)).unwrap();
    let exact = run(&dp, "full: own cgroup, exact hit", &cg.path, prog_names::CONNECT4, LO4);
    // 3. full hook, audit miss → would_reject + ring-buffer event per call (no reader: the
    //    ring fills, then every call is a failed reserve + dropped counter).
    dp.maps.set_cgroup(cg.id(), state(1, MODE_AUDIT, 1)).unwrap();
    let miss = run(
        &dp,
        "full: audit miss + event, no dedup",
        &cg.path,
        prog_names::CONNECT4,
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)),
    );
    let dropped = dp.maps.global(GLOBAL_EVENTS_DROPPED).unwrap();
    let drained = dp.maps.drain_events().len();
    // 3b. same with a 1 s de-dup window: one event, then LRU hits.
    dp.maps.set_config(Config { dedup_window_ns: 1_000_000_000, ..Config::default() }).unwrap();
    let miss_dedup = run(
        &dp,
        "full: audit miss + event, 1 s dedup",
        &cg.path,
        prog_names::CONNECT4,
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)),
    );
    let deduped = dp.maps.global(GLOBAL_EVENTS_DEDUPED).unwrap();
    let drained_dedup = dp.maps.drain_events().len();
    // 4. full hook, process 3 levels below the registered cgroup (ancestor walk), first with
    //    an unknown max level (walk from level 15), then with max_level = registered level.
    dp.maps.set_cgroup(cg.id(), state(1, MODE_ENFORCE, 1)).unwrap();
    dp.maps.set_config(Config { max_level: 0, ..Config::default() }).unwrap();
    let walk_full = run(&dp, "full: nested 3 below, walk from level 15", &nested, prog_names::CONNECT4, LO4);
    let level = cgroup_level(&cg.path).unwrap();
    dp.maps.set_config(Config { max_level: level, ..Config::default() }).unwrap();
    let walk = run(&dp, "full: nested 3 below, walk from max_level", &nested, prog_names::CONNECT4, LO4);
    // 5. full hook, registered, with candidate shadow (2 rulesets evaluated).
    dp.maps
        .set_cgroup(
            cg.id(),
            CgroupState {
                candidate_ruleset: 2,
                flags: depfence_bpf_common::FLAG_CANDIDATE_HAS_CIDR,
                ..state(1, MODE_ENFORCE, 1)
            },
        )
        .unwrap();
    let cand = run(&dp, "full: exact hit + candidate (CIDR LPM)", &cg.path, prog_names::CONNECT4, LO4);
    // 6. full hook, CIDR ruleset (hash miss ×2 → LPM hit).
    dp.maps.set_cgroup(cg.id(), CgroupState { flags: FLAG_ACTIVE_HAS_CIDR, ..state(2, MODE_ENFORCE, 1) }).unwrap();
    let cidr = run(&dp, "full: CIDR hit (2 hash misses + LPM)", &cg.path, prog_names::CONNECT4, LO4);
    eprintln!(
        "ratios vs baseline: exact {:.2}x, audit-miss+event {:.2}x, audit-miss+dedup {:.2}x, walk(15) {:.2}x, walk(max_level={level}) {:.2}x, candidate {:.2}x, cidr {:.2}x",
        exact / base,
        miss / base,
        miss_dedup / base,
        walk_full / base,
        walk / base,
        cand / base,
        cidr / base
    );
    eprintln!("events: no dedup drained {drained} dropped {dropped}; dedup drained {drained_dedup} deduped {deduped}");
    assert_eq!(drained_dedup, 1);
    assert_eq!(deduped, n - 1);
    // Cross-check with bpftool (kernel accounting is the same; bpftool reads it by prog id).
    for name in [prog_names::BASELINE4, prog_names::CONNECT4] {
        if let Ok(out) = Command::new("bpftool").args(["prog", "show", "name", name]).output() {
            eprintln!("bpftool: {}", String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or(""));
        }
    }
    let _ = io::stderr().flush();
}

#[test]
fn refuses_pinned_maps_of_another_abi() {
    if !privileged() {
        return;
    }
    let pins = Pins::new();
    {
        let dp = Datapath::load(&pins.layout).unwrap();
        for name in prog_names::ALL {
            let info = dp.ebpf().program(name).unwrap().info().unwrap();
            eprintln!(
                "{name}: verified insns {:?}, xlated bytes {:?}",
                info.verified_instruction_count(),
                info.size_translated()
            );
        }
    }
    // Corrupt the ABI record in the pinned META map, as an older/newer agent would have left it.
    let data = aya::maps::MapData::from_pin(pins.layout.map(depfence_bpf_common::map_names::META)).unwrap();
    let mut meta: aya::maps::Array<_, depfence_bpf_common::Meta> =
        aya::maps::Array::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap();
    meta.set(0, depfence_bpf_common::Meta { abi_version: 99, _reserved: 0 }, 0).unwrap();
    match Datapath::load(&pins.layout) {
        Err(e) => {
            eprintln!("refused as expected: {e}");
            assert!(matches!(e, depfence::datapath::DatapathError::AbiMismatch { found: 99 }));
        }
        Ok(_) => panic!("loaded over pinned maps of ABI 99"),
    }
    assert!(Adopted::open(&pins.layout).is_err());
}

/// The whole path: policy text → compiled snapshot → kernel maps → a real process in the
/// service's cgroup is refused what the policy does not allow.
#[test]
fn compiled_policy_is_enforced_in_the_kernel() {
    if !privileged() {
        return;
    }
    let cg = Cgroup::new();
    let pins = Pins::new();
    let mut dp = attached(&cg, &pins);
    let db_port = tcp_listener(LO4);
    let other_port = tcp_listener(LO4);
    let (udp6, udp6_port) = udp_receiver(LO6);
    let text = format!(
        r#"
version = 1
[environments]
qa = "enforce"
[services.db]
endpoints = [{{ ip = "127.0.0.1", ports = [{db_port}], proto = "tcp" }}]
[services.app]
allow = [
  {{ service = "db" }},
  {{ cidr = "::/127", ports = [{udp6_port}], proto = "udp" }},
]
"#
    );
    let compiled = depfence::compile::compile_str("app.toml", &text).unwrap_or_else(|(_, d)| panic!("{d:?}"));
    let (_, app) = compiled.snapshot.service("app").unwrap();
    let ruleset = compile(1, &allows_from_snapshot(&app.rules(0).net_rules)).unwrap();
    assert!(!ruleset.cidrs.is_empty());
    dp.maps.install(&ruleset).unwrap();
    dp.maps.set_cgroup(cg.id(), CgroupState { flags: FLAG_ACTIVE_HAS_CIDR, ..state(1, MODE_ENFORCE, 7) }).unwrap();

    assert_eq!(probe(&cg.path, "tcp", LO4, db_port, 1), Ok(1), "the allowed dependency");
    assert_eq!(probe(&cg.path, "tcp", LO4, other_port, 1), Err(EPERM), "not in the policy");
    assert_eq!(probe(&cg.path, "udp", LO6, udp6_port, 1), Ok(1), "allowed UDP block");
    assert_eq!(probe(&cg.path, "udp", LO6, other_port, 1), Err(EPERM), "UDP to another port");
    let mut buf = [0u8; 64];
    udp6.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(udp6.recv(&mut buf).is_ok(), "the allowed datagram arrived");
    assert_eq!(dp.maps.counter(7, VERDICT_ALLOWED).unwrap(), 2);
    assert_eq!(dp.maps.counter(7, VERDICT_REJECTED).unwrap(), 2);
}
