//! Edit to enforce: how long after a one-service edit of a policy directory is written the
//! edited service's cgroup points at its new ruleset in the kernel (the file watch, the settle
//! time, the compile and the delta apply), with a real agent. The suite runs it on a small
//! generated policy, to prove it works; `scripts/edit-latency` runs it on 10,000 services and
//! 1,000,000 allow entries in a release build and prints the figures for BENCHMARKS.md. Root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::time::{Duration, Instant};

use depfence::cgroup::cgroup_id;
use depfence::datapath::Maps;
use depfence::synth::{SynthSpec, generate, service_name};
use depfence_integration::agent::Agent;
use depfence_integration::fixture::Cgroup;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn a_one_service_edit_is_in_force_soon_after_it_is_written() {
    if !depfence_integration::require_privileges("a_one_service_edit_is_in_force_soon_after_it_is_written") {
        return;
    }
    let spec = SynthSpec::new(env_or("DEPFENCE_EDIT_SERVICES", 200), env_or("DEPFENCE_EDIT_ENTRIES", 20_000));
    let (with_cgroups, rounds) = (env_or("DEPFENCE_EDIT_CGROUPS", 20), env_or("DEPFENCE_EDIT_ROUNDS", 3));
    let dir = tempfile::tempdir().unwrap();
    let files = generate(&spec);
    for (name, text) in &files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    // Cgroups for the first services with a path selector, under this test's own subtree.
    let mut cgroups = Cgroup::new();
    cgroups.child("system.slice");
    let mut placed = Vec::new();
    for i in 0..spec.services {
        let name = service_name(&spec, i);
        let selector = format!("cgroup = \"system.slice/{name}.service\"");
        let Some((file, _)) = files.iter().find(|(_, text)| text.contains(&selector)) else { continue };
        let path = cgroups.child(&format!("system.slice/{name}.service"));
        placed.push((name, file.clone(), path));
        if placed.len() == with_cgroups {
            break;
        }
    }
    let root = cgroups.relative();
    // The agent's own settle time unless DEPFENCE_EDIT_SETTLE_MS says otherwise (to measure the
    // rest of the path).
    let settle = std::env::var("DEPFENCE_EDIT_SETTLE_MS").ok().map(|ms| format!("{ms}ms"));
    let mut args = vec!["--cgroup-root", &root, "--no-dns"];
    if let Some(settle) = &settle {
        args.extend(["--reload-settle", settle]);
    }
    let agent = Agent::start_with(&assert_cmd::cargo::cargo_bin("policyctl"), dir.path(), "prod", &args);
    agent.wait_status("every placed service registered", |s| {
        s.services.iter().filter(|s| !s.cgroups.is_empty()).count() == placed.len()
    });
    let maps = Maps::from_pins(agent.pins()).unwrap();
    let state_of = |path: &std::path::Path| maps.cgroups.get(&cgroup_id(path).unwrap(), 0).unwrap();

    let mut took = Vec::new();
    for (round, (name, file, path)) in placed.iter().cycle().take(rounds).enumerate() {
        let (before, untouched) = (state_of(path), placed.iter().find(|p| p.0 != *name).map(|p| state_of(&p.2)));
        let file = dir.path().join(file);
        let text = std::fs::read_to_string(&file).unwrap();
        let entry = format!("{{ ip = \"127.0.0.9\", ports = [{}], proto = \"tcp\" }}", 20000 + round);
        let edited = depfence::policy::edit::add_allow_entry(&text, name, &entry).unwrap();
        // Written whole (a rename), as editors and `git` do.
        let staged = dir.path().join(".edit.tmp");
        std::fs::write(&staged, &edited).unwrap();
        let start = Instant::now();
        std::fs::rename(&staged, &file).unwrap();
        while state_of(path).ruleset_id == before.ruleset_id {
            assert!(start.elapsed() < Duration::from_secs(60), "round {round}: the edit of `{name}` never took effect");
            std::thread::sleep(Duration::from_micros(200));
        }
        took.push(start.elapsed());
        if let Some(state) = untouched {
            let other = placed.iter().find(|p| p.0 != *name).unwrap();
            assert_eq!(state_of(&other.2), state, "round {round}: another service's cgroup was repointed");
        }
    }
    took.sort();
    let ms: Vec<String> = took.iter().map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0)).collect();
    println!(
        "edit to enforce, {} services / {} entries, {} with cgroups, settle {}: median {:.1} ms, each (sorted) {} ms",
        spec.services,
        spec.allow_entries,
        placed.len(),
        settle.as_deref().unwrap_or("the default"),
        took[took.len() / 2].as_secs_f64() * 1000.0,
        ms.join(", ")
    );
    // The agent's memory after the edits: what it holds (policy, caches, books) and its peak.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
    let memory: Vec<&str> =
        status.lines().filter(|l| l.starts_with("VmRSS:") || l.starts_with("VmHWM:")).map(str::trim).collect();
    println!("agent memory: {}", memory.join(", "));
    let log = agent.log_text();
    for line in log.lines().filter(|l| l.contains("policy applied")).take(rounds + 1) {
        println!("{line}");
    }
}
