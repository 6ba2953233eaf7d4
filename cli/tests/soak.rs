//! The soak: a real agent swaps its policy every 100 ms (`DEPFENCE_SOAK_SWAP_MS`) for ten
//! minutes (`DEPFENCE_SOAK_SECONDS`) while clients in its cgroup connect without pause. Every
//! event must carry the verdict of the generation it names (no torn verdict), the kernel's
//! counters must agree with the clients connect for connect, and neither the agent's memory nor
//! the maps may grow. Kept out of the default suite (`#[ignore]`): `scripts/soak` runs it, and
//! BENCHMARKS.md records a run. Root only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use depfence::agent::control::{self, AgentStatus, Request};
use depfence::agent::telemetry::EventKind;
use depfence::cgroup::spawn_in;
use depfence::datapath::Maps;
use depfence::verdict::Verdict;
use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, crate_binary, tcp_listener};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `app` may reach `both` always, and `x` (policy A) or `y` (policy B).
fn policy_text(top: &str, both: u16, which: u16) -> String {
    format!(
        "version = 1\n[environments]\nprod = \"enforce\"\n[services.db]\n\
         endpoints = [{{ ip = \"127.0.0.1\", ports = [{both}, {which}], proto = \"tcp\" }}]\n\
         [services.app]\ncgroup = \"{top}/app\"\nallow = [{{ service = \"db\" }}]\n"
    )
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Connects to `port` from `cgroup` in rounds of 100 until `stop`; returns [ok, eperm,
/// aborted, other]. Aborted: a connect the agent's sweep closed (`ECONNABORTED`), because the
/// policy swapped to one that refuses it while it was being made.
fn client(cgroup: PathBuf, port: u16, stop: Arc<AtomicBool>) -> [u64; 4] {
    let mut sums = [0u64; 4];
    while !stop.load(Ordering::Relaxed) {
        let mut cmd = Command::new(crate_binary("depfence-probe"));
        cmd.args(["tally", "127.0.0.1", &port.to_string(), "100"]).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = spawn_in(&cgroup, &mut cmd).unwrap().wait_with_output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
        sums[0] += fields[0];
        sums[1] += fields[1];
        let mut others = 0;
        for errors in String::from_utf8_lossy(&out.stderr).lines() {
            let f: Vec<i64> = errors.split_whitespace().skip(1).map(|v| v.parse().unwrap()).collect();
            let slot = if f[0] == i64::from(libc::ECONNABORTED) { 2 } else { 3 };
            sums[slot] += u64::try_from(f[1]).unwrap();
            others += u64::try_from(f[1]).unwrap();
        }
        assert_eq!(others, fields[2], "the probe names every other error (an old depfence-probe binary?)");
    }
    sums
}

#[test]
#[ignore = "ten minutes: run by scripts/soak"]
fn soak_policy_swaps_under_load() {
    if !depfence_integration::require_privileges("soak_policy_swaps_under_load") {
        return;
    }
    let seconds = env_or("DEPFENCE_SOAK_SECONDS", 600);
    let swap_every = Duration::from_millis(env_or("DEPFENCE_SOAK_SWAP_MS", 100));
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (both, x, y) = (tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let top = cgroups.relative();
    std::fs::write(&policy, policy_text(&top, both, x)).unwrap();
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");

    // Which port each generation refuses, from the agent's own answer to each reload.
    let refused_in: Arc<Mutex<BTreeMap<u32, u16>>> = Arc::new(Mutex::new(BTreeMap::from([(1, y)])));
    let torn = Arc::new(Mutex::new(Vec::new()));
    let events_seen = Arc::new(Mutex::new(0u64));
    {
        let (socket, refused_in, torn, events_seen) =
            (agent.socket.clone(), Arc::clone(&refused_in), Arc::clone(&torn), Arc::clone(&events_seen));
        std::thread::spawn(move || {
            let _ = control::follow_events(&socket, 0, true, |event| {
                if event.kind != EventKind::Destination || event.verdict != Verdict::Rejected {
                    return true;
                }
                *events_seen.lock().unwrap() += 1;
                let port: u16 = event.destination.rsplit_once(':').unwrap().1.trim_end_matches("/tcp").parse().unwrap();
                // The generation may be announced a moment after its first event: wait for it.
                let deadline = Instant::now() + Duration::from_secs(2);
                let expected = loop {
                    if let Some(p) = refused_in.lock().unwrap().get(&event.generation) {
                        break Some(*p);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                if expected != Some(port) {
                    torn.lock().unwrap().push((event.generation, port, expected));
                }
                true
            });
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = [both, x, y]
        .into_iter()
        .map(|port| {
            let (app, stop) = (app.clone(), Arc::clone(&stop));
            (port, std::thread::spawn(move || client(app, port, stop)))
        })
        .collect();

    let started = Instant::now();
    let mut warm: Option<u64> = None;
    let mut swaps = 0u64;
    let mut next = started;
    while started.elapsed() < Duration::from_secs(seconds) {
        let allow = if swaps.is_multiple_of(2) { y } else { x };
        std::fs::write(&policy, policy_text(&top, both, allow)).unwrap();
        let body = control::request(&agent.socket, &Request::Reload).unwrap();
        let status: AgentStatus = serde_json::from_value(body).unwrap();
        refused_in.lock().unwrap().insert(status.generation, if allow == x { y } else { x });
        swaps += 1;
        if warm.is_none() && started.elapsed() > Duration::from_secs(seconds.min(600) / 10) {
            warm = Some(rss_kib(agent.pid()));
        }
        next += swap_every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let tallies: BTreeMap<u16, [u64; 4]> = clients.into_iter().map(|(port, h)| (port, h.join().unwrap())).collect();
    std::thread::sleep(Duration::from_millis(500));
    let end_rss = rss_kib(agent.pid());
    let warm = warm.unwrap_or(end_rss);

    let maps = Maps::from_pins(agent.pins()).unwrap();
    let mut rulesets = BTreeMap::<u32, usize>::new();
    for key in maps.rules.keys() {
        *rulesets.entry(key.unwrap().ruleset).or_default() += 1;
    }
    let status = agent.status();
    let app_status = status.services.iter().find(|s| s.name == "app").unwrap();
    // An aborted connect was allowed by the hook, then closed by the sweep.
    let total: u64 = tallies.values().map(|t| t[0] + t[1] + t[2]).sum();
    let eperm: u64 = tallies.values().map(|t| t[1]).sum();
    eprintln!(
        "soak: {seconds} s, {swaps} swaps (every {swap_every:?}), generation {}; clients [ok, eperm, aborted, other] \
         {tallies:?}; {} refusal events checked; agent RSS {warm} KiB after warm-up, {end_rss} KiB at the end; \
         DF_RULES per ruleset {rulesets:?}",
        status.generation,
        events_seen.lock().unwrap()
    );
    eprintln!("kernel: {:?}", app_status.counts);
    assert_eq!(app_status.counts.allowed + app_status.counts.rejected, total, "the kernel counted every connect");
    assert_eq!(app_status.counts.rejected, eperm);
    let torn = torn.lock().unwrap();
    assert!(torn.is_empty(), "events whose verdict is not their generation's: {:?}", &torn[..torn.len().min(10)]);
    assert_eq!(tallies[&both][1..], [0, 0, 0], "the port every generation allows was never refused");
    for port in [x, y] {
        assert_eq!(tallies[&port][3], 0, "only success, EPERM, or a connect the sweep closed");
        assert!(tallies[&port][0] > 0 && tallies[&port][1] > 0, "port {port} saw both policies");
    }
    assert_eq!(rulesets.values().copied().collect::<Vec<_>>(), [2], "one generation in the maps: {rulesets:?}");
    assert!(end_rss <= warm + 8 * 1024, "the agent grew from {warm} KiB to {end_rss} KiB");
}
