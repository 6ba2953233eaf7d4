//! A delta apply on a real agent and the real kernel: edits to one service's rules swap that
//! service's ruleset alone. The other service's cgroup keeps its ruleset and state (read back
//! from `DF_CGROUPS`) and its clients, connecting all along, are never refused; the edited
//! service's verdicts follow each edit. Run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use depfence::cgroup::cgroup_id;
use depfence::datapath::Maps;
use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, EPERM, LO4, probe, tcp_listener};

fn policy(top: &str, a: u16, b: u16) -> String {
    format!(
        "version = 1\n[environments]\nprod = \"enforce\"\n\n\
         [services.steady]\ncgroup = \"{top}/steady\"\nallow = [{{ ip = \"127.0.0.1\", ports = [{a}], proto = \"tcp\" }}]\n\n\
         [services.edited]\ncgroup = \"{top}/edited\"\nallow = [{{ ip = \"127.0.0.1\", ports = [{b}], proto = \"tcp\" }}]\n"
    )
}

#[test]
fn edits_swap_only_the_edited_service() {
    if !depfence_integration::require_privileges("edits_swap_only_the_edited_service") {
        return;
    }
    let mut cgroups = Cgroup::new();
    let (steady, edited) = (cgroups.child("steady"), cgroups.child("edited"));
    let (a, b1, b2) = (tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    let top = cgroups.relative();
    std::fs::write(&path, policy(&top, a, b1)).unwrap();
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &path, "prod");
    agent.wait_status("both registered", |s| s.services.iter().filter(|s| !s.cgroups.is_empty()).count() == 2);
    let maps = Maps::from_pins(agent.pins()).unwrap();
    let state_of = |dir: &std::path::Path| maps.cgroups.get(&cgroup_id(dir).unwrap(), 0).unwrap();
    let steady_state = state_of(&steady);

    // The steady service's client connects all along.
    let (stop, refused, made) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (steady, stop, refused, made) =
            (steady.clone(), Arc::clone(&stop), Arc::clone(&refused), Arc::clone(&made));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match probe(&steady, "tcp", LO4, a, 50) {
                    Ok(n) => made.fetch_add(n, Ordering::Relaxed),
                    Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let mut rulesets = vec![state_of(&edited).ruleset_id];
    for generation in 2..=11u32 {
        let (allowed, refused_port) = if generation % 2 == 0 { (b2, b1) } else { (b1, b2) };
        std::fs::write(&path, policy(&top, a, allowed)).unwrap();
        agent.wait_status("the edit in force", |s| s.generation == generation);
        assert_eq!(probe(&edited, "tcp", LO4, allowed, 1), Ok(1), "generation {generation}");
        assert_eq!(probe(&edited, "tcp", LO4, refused_port, 1), Err(EPERM), "generation {generation}");
        assert_eq!(state_of(&steady), steady_state, "generation {generation}: the steady cgroup is untouched");
        let edited_state = state_of(&edited);
        assert_eq!(edited_state.generation, generation);
        rulesets.push(edited_state.ruleset_id);
    }
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert_eq!(refused.load(Ordering::Relaxed), 0, "the steady service was never refused");
    assert!(made.load(Ordering::Relaxed) >= 50, "its client connected: {}", made.load(Ordering::Relaxed));
    let distinct: std::collections::BTreeSet<u32> = rulesets.iter().copied().collect();
    assert_eq!(distinct.len(), rulesets.len(), "each edit is a new ruleset of the edited service: {rulesets:?}");
    // Nothing of the edited service's old rulesets is left.
    let ids = maps.ruleset_ids();
    assert_eq!(ids, [steady_state.ruleset_id, *rulesets.last().unwrap()].into(), "{ids:?}");
}
