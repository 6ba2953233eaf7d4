//! Declared against observed, on a real agent with real clients: the kernel counts each allow
//! rule's hits, `status` shows them, and `policyctl unused` lists exactly the dependencies and
//! rules nothing used, also after a reload that renumbers the rules. Run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Output;

use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, probe, tcp_listener};

const LITERAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));

fn unused(agent: &Agent, extra: &[&str]) -> Output {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
        .args(["unused", "--agent"])
        .arg(&agent.socket)
        .args(extra)
        .output()
        .unwrap()
}

fn policy(cgroup: &str, ports: [u16; 5], extra: &str) -> String {
    let [db1, db2, cache, spare, literal] = ports;
    format!(
        "version = 1\n[environments]\nprod = \"audit\"\n\n\
         [services.db]\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{db1}, {db2}], proto = \"tcp\" }}]\n\n\
         [services.cache]\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{cache}], proto = \"tcp\" }}]\n\n\
         [services.spare]\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{spare}], proto = \"tcp\" }}]\n\n\
         [services.app]\ncgroup = \"{cgroup}/app\"\nallow = [\n  {{ service = \"db\" }},\n  {{ service = \"cache\" }},\n  \
         {{ service = \"spare\" }},\n  {{ ip = \"127.0.0.9\", ports = [{literal}], proto = \"tcp\" }},{extra}\n]\n"
    )
}

#[test]
fn unused_lists_exactly_what_no_connection_used() {
    if !depfence_integration::require_privileges("unused_lists_exactly_what_no_connection_used") {
        return;
    }
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let ports = [tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LO4), tcp_listener(LITERAL)];
    let [db1, db2, cache, spare, literal] = ports;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy(&cgroups.relative(), ports, "")).unwrap();
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &path, "prod");
    agent.wait_status("app registered", |s| s.services.iter().any(|s| s.name == "app" && !s.cgroups.is_empty()));

    assert_eq!(probe(&app, "tcp", LO4, db1, 3), Ok(3));
    assert_eq!(probe(&app, "tcp", LO4, cache, 2), Ok(2));
    assert_eq!(probe(&app, "tcp", LITERAL, literal, 1), Ok(1));
    let rule = |port: u16, service: &str| format!("127.0.0.1/32 port {port}, tcp (service `{service}`)");
    let status = agent.wait_status("six hits", |s| {
        s.services.iter().any(|s| s.name == "app" && s.rules.iter().map(|r| r.hits).sum::<u64>() == 6)
    });
    let app_status = status.services.iter().find(|s| s.name == "app").unwrap();
    let hits = |name: &str| app_status.rules.iter().find(|r| r.rule == name).map(|r| r.hits);
    assert_eq!(hits(&rule(db1, "db")), Some(3));
    assert_eq!(hits(&rule(db2, "db")), Some(0));
    assert_eq!(hits(&rule(cache, "cache")), Some(2));
    assert_eq!(hits(&rule(spare, "spare")), Some(0));
    assert_eq!(hits(&format!("127.0.0.9/32 port {literal}, tcp")), Some(1));
    assert_eq!(app_status.counts.allowed, 6, "one hit per allowed connection");

    // Text: the unused dependency with its rule and position, the unused rule of a used one.
    let out = unused(&agent, &["--window", "1h"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(10), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("unused dependency: `app` -> `spare` (no hit in the last 1h)"), "{stdout}");
    assert!(stdout.contains(&format!("  rule {} (at ", rule(spare, "spare"))), "{stdout}");
    assert!(stdout.contains(&format!("unused rule of `app`: {} (at ", rule(db2, "db"))), "{stdout}");
    assert!(!stdout.contains("cache") && !stdout.contains("127.0.0.9"), "{stdout}");
    // JSON: exactly those.
    let out = unused(&agent, &["-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["unused"]["dependencies"], serde_json::json!([["app", "spare"]]));
    assert_eq!(json["unused"]["rules"][0][1], serde_json::json!(rule(db2, "db")));
    assert_eq!(json["unused"]["rules"].as_array().unwrap().len(), 1);

    // A reload with a rule that sorts first (the rules are renumbered): hits still go to their
    // rule, before and after; using the last two leaves nothing unused.
    std::fs::write(
        &path,
        policy(&cgroups.relative(), ports, "\n  { ip = \"127.0.0.0\", ports = [1], proto = \"tcp\" },"),
    )
    .unwrap();
    agent.wait_status("the edit in force", |s| s.generation == 2);
    assert_eq!(probe(&app, "tcp", LO4, db2, 1), Ok(1));
    assert_eq!(probe(&app, "tcp", LO4, spare, 1), Ok(1));
    assert_eq!(probe(&app, "tcp", LO4, db1, 1), Ok(1));
    agent.wait_status("hits after the reload", |s| {
        s.services.iter().any(|s| s.name == "app" && s.rules.iter().any(|r| r.rule == rule(db1, "db") && r.hits == 4))
    });
    let out = unused(&agent, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(10), "{stdout}");
    assert!(stdout.contains("unused dependency: `app` -> `127.0.0.0/32`"), "only the new rule: {stdout}");
    assert_eq!(stdout.matches("unused").count(), 1, "{stdout}");
}
