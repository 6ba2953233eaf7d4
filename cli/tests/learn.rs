//! `policyctl learn` against a real agent in audit and real clients: a service connects to a
//! declared service of its own layer, to one of a higher layer and to an address no service
//! owns. `learn` proposes the service reference and the literal, refuses the layer violation
//! with the compiler's words, and its `--write` result compiles and, applied by the agent, turns
//! those would-rejects into allowed connections. Run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Output;

use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, probe, tcp_listener};

const NOBODY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

fn learn(agent: &Agent, policy: &std::path::Path, extra: &[&str]) -> Output {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
        .args(["learn", "--policy"])
        .arg(policy)
        .arg("--agent")
        .arg(&agent.socket)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn learn_proposes_what_the_evidence_asks_and_the_model_allows() {
    if !depfence_integration::require_privileges("learn_proposes_what_the_evidence_asks_and_the_model_allows") {
        return;
    }
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (db, peer, web, nobody) = (tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LO4), tcp_listener(NOBODY));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let text = format!(
        "version = 1\n[environments]\nprod = \"audit\"\n[model]\nlayers = [\"data\", \"apps\", \"edge\"]\n\n\
         [services.db]\nlayer = \"data\"\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{db}], proto = \"tcp\" }}]\n\n\
         [services.peer]\nlayer = \"apps\"\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{peer}], proto = \"tcp\" }}]\n\n\
         [services.web]\nlayer = \"edge\"\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{web}], proto = \"tcp\" }}]\n\n\
         [services.app]\nlayer = \"apps\"\ncgroup = \"{}/app\"\nallow = [\n  {{ service = \"db\" }},\n]\n",
        cgroups.relative()
    );
    std::fs::write(&policy, &text).unwrap();
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    agent.wait_status("app registered", |s| s.services.iter().any(|s| s.name == "app" && !s.cgroups.is_empty()));

    for (ip, port) in [(LO4, db), (LO4, peer), (LO4, web), (NOBODY, nobody)] {
        assert_eq!(probe(&app, "tcp", ip, port, 1), Ok(1), "audit lets it through");
    }
    let counted = agent.wait_status("three would-rejects", |s| {
        s.services.iter().any(|s| s.name == "app" && s.counts.would_reject == 3)
    });
    let allowed_before = counted.services.iter().find(|s| s.name == "app").unwrap().counts.allowed;

    // Without --write: a diff, and exit 11 (one entry needs a decision).
    let out = learn(&agent, &policy, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(11), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("propose for `app`: { service = \"peer\", reason = \"learned: 1 would-reject(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "propose for `app`: {{ ip = \"127.0.0.9\", ports = [{nobody}], proto = \"tcp\", reason ="
        )),
        "{stdout}"
    );
    assert!(stdout.contains("(an address no declared service owns: declare its owner?)"), "{stdout}");
    assert!(stdout.contains("needs a decision for `app`: { service = \"web\""), "{stdout}");
    assert!(
        stdout.contains("depfence::layer_violation: `app` (layer `apps`) depends on `web` in the higher layer `edge`"),
        "{stdout}"
    );
    assert!(stdout.contains("+  { service = \"peer\""), "a diff: {stdout}");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), text, "nothing written without --write");
    // Deterministic.
    assert_eq!(String::from_utf8_lossy(&learn(&agent, &policy, &[]).stdout), stdout);

    // --write: the policy compiles, the agent applies it, and the same connections are allowed.
    let out = learn(&agent, &policy, &["--write"]);
    assert_eq!(out.status.code(), Some(11), "{out:?}");
    let written = std::fs::read_to_string(&policy).unwrap();
    depfence::compile::compile_str("policy.toml", &written).unwrap_or_else(|(_, d)| panic!("{d:?}\n{written}"));
    assert!(written.contains("  { service = \"db\" },\n  { service = \"peer\", reason = "), "{written}");
    agent.wait_status("the learned policy in force", |s| s.generation == 2);
    for (ip, port) in [(LO4, peer), (NOBODY, nobody)] {
        assert_eq!(probe(&app, "tcp", ip, port, 1), Ok(1));
    }
    let status = agent.wait_status("two more allowed", |s| {
        s.services.iter().any(|s| s.name == "app" && s.counts.allowed == allowed_before + 2)
    });
    assert_eq!(status.services.iter().find(|s| s.name == "app").unwrap().counts.would_reject, 3, "no new would-reject");

    // What is allowed now is not proposed again; the layer violation still needs a decision.
    let out = learn(&agent, &policy, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(11), "{stdout}");
    assert!(!stdout.contains("propose for"), "{stdout}");
}
