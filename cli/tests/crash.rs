//! `kill -9` of the agent in the middle of a hot swap of 200,000 rules, again and again: each
//! restarted agent leaves exactly the generation in force in the maps (nothing orphaned, no
//! growth), and a client connecting throughout never sees the last good policy lapse. Root
//! only; under CI a skip is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use depfence::cgroup::spawn_in;
use depfence::datapath::Maps;
use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, crate_binary, tcp_listener};

/// Hosts × ports of filler rules: 200,000 exact entries besides the real dependency.
const HOSTS: u32 = 2_000;
const PORTS: u16 = 100;
const KILLS: usize = 20;

/// The policy: `app` (enforce) may reach `db`, plus 200,000 filler host:port rules in the
/// address block `10.<block>.0.0/16`; a swap between two blocks replaces every entry.
fn write_policy(path: &Path, top: &str, db: u16, block: u8) {
    let ports: Vec<String> = (1..=PORTS).map(|p| p.to_string()).collect();
    let ports = ports.join(", ");
    let mut text = format!(
        "version = 1\n[environments]\nprod = \"enforce\"\n\n[services.db]\n\
         endpoints = [{{ ip = \"127.0.0.1\", ports = [{db}], proto = \"tcp\" }}]\n\n\
         [services.app]\ncgroup = \"{top}/app\"\nallow = [\n  {{ service = \"db\" }},\n"
    );
    for host in 0..HOSTS {
        let (hi, lo) = (host / 250, host % 250 + 1);
        writeln!(text, "  {{ ip = \"10.{block}.{hi}.{lo}\", ports = [{ports}], proto = \"tcp\" }},").unwrap();
    }
    text.push_str("]\n");
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Entries per ruleset id in `DF_RULES`, and each registered cgroup's ruleset.
fn kernel_books(agent: &Agent) -> (BTreeMap<u32, usize>, Vec<u32>) {
    let maps = Maps::from_pins(agent.pins()).unwrap();
    let mut per_ruleset = BTreeMap::new();
    for key in maps.rules.keys() {
        *per_ruleset.entry(key.unwrap().ruleset).or_default() += 1;
    }
    let pointed = maps.cgroup_states().into_iter().map(|(_, s)| s.ruleset_id).collect();
    (per_ruleset, pointed)
}

/// Connects from `cgroup` to the allowed and the refused port in rounds until `stop`, and
/// returns every round whose outcome was not the policy's: `(port, tally line)`.
fn watch_for_lapses(cgroup: PathBuf, db: u16, other: u16, stop: Arc<AtomicBool>) -> Vec<(u16, String)> {
    let mut lapses = Vec::new();
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) || rounds == 0 {
        std::thread::sleep(Duration::from_millis(20));
        for (port, expected) in [(db, "tally 50 0 0"), (other, "tally 0 50 0")] {
            let mut cmd = Command::new(crate_binary("depfence-probe"));
            cmd.args(["tally", "127.0.0.1", &port.to_string(), "50"]).stdout(Stdio::piped());
            let out = spawn_in(&cgroup, &mut cmd).unwrap().wait_with_output().unwrap();
            let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if line != expected {
                lapses.push((port, line));
            }
        }
        rounds += 1;
    }
    eprintln!("{rounds} rounds of 50 + 50 connects");
    lapses
}

/// A small xorshift: the kill points vary from run to run (the seed is printed).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn kill_9_during_a_hot_swap_leaves_exactly_the_generation_in_force() {
    let test = "kill_9_during_a_hot_swap_leaves_exactly_the_generation_in_force";
    if !depfence_integration::require_privileges(test) {
        return;
    }
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_policy(&policy, &cgroups.relative(), db, 1);
    let mut agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    let (books, pointed) = kernel_books(&agent);
    let expected = usize::try_from(HOSTS).unwrap() * usize::from(PORTS) + 1;
    assert_eq!(books.values().copied().collect::<Vec<_>>(), [expected], "one generation: {books:?}");
    assert_eq!(pointed, books.keys().copied().collect::<Vec<_>>());

    // How long a reload takes here, to aim the kills inside it.
    let started = Instant::now();
    write_policy(&policy, &cgroups.relative(), db, 2);
    agent.wait_status("second generation", |s| s.generation == 2);
    let swap = started.elapsed();
    eprintln!("a reload of {expected} entries took {swap:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (app, stop) = (app.clone(), Arc::clone(&stop));
        std::thread::spawn(move || watch_for_lapses(app, db, other, stop))
    };
    let mut seed = u64::from(std::process::id()) << 20 | u64::from(started.elapsed().subsec_nanos()) | 1;
    eprintln!("kill points seed {seed}");
    for round in 0..KILLS {
        let block = if round % 2 == 0 { 1 } else { 2 };
        write_policy(&policy, &cgroups.relative(), db, block);
        let delay = Duration::from_micros(next(&mut seed) % (swap.as_micros() as u64 * 3 / 2).max(1));
        std::thread::sleep(delay);
        agent.kill9();
        let (books, pointed) = kernel_books(&agent);
        eprintln!("round {round}: killed after {delay:?}: rulesets {books:?}, in force {pointed:?}");
        if round % 4 == 3 {
            // The policy changed again while the agent was down: the restart applies another
            // policy than the one it was killed writing.
            write_policy(&policy, &cgroups.relative(), db, 3 - block);
        }
        agent.spawn(&policy, "prod");
        let (books, pointed) = kernel_books(&agent);
        assert_eq!(
            books.values().copied().collect::<Vec<_>>(),
            [expected],
            "round {round}: exactly one generation after the restart, nothing orphaned: {books:?}"
        );
        assert_eq!(pointed, books.keys().copied().collect::<Vec<_>>(), "round {round}: the cgroup points at it");
    }
    stop.store(true, Ordering::Relaxed);
    let lapses = watcher.join().unwrap();
    assert!(lapses.is_empty(), "the last good policy lapsed: {lapses:?}");
    // The filler's last block is the one in force: a connect to it would be allowed.
    let status = agent.status();
    assert!(status.ready && status.last_reload.as_ref().is_some_and(|r| r.ok), "{status:?}");
}
