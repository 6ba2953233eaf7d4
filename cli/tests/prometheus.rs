//! End to end from the kernel to an alert (root): a real `policyctl agent`, real connects from a
//! test cgroup, a real Prometheus server scraping the agent with the shipped alert rules
//! (`deploy/prometheus/depfence-alerts.yml`). Skips with a reason without root, cgroup v2 or
//! `prometheus`; under CI (`CI=true`) a skip is a failure.
//!
//! `cargo build -p depfence-integration --bins && cargo test -p policyctl --test prometheus`
//! (the probe binary must be built).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, probe, tcp_listener};
use depfence_integration::prometheus::{Prometheus, Sample, require_tool};

/// How long one wait may take; the whole test takes about ten seconds.
const WAIT: Duration = Duration::from_secs(20);
/// Connects from app to an undeclared port.
const UNDECLARED_CONNECTS: u32 = 3;

/// app (cgroup `<top>/app`) is in audit and may reach db only.
fn write_policy(path: &Path, top: &str, db_port: u16) {
    let text = format!(
        r#"version = 1
[environments]
prod = "audit"

[services.db]
endpoints = [{{ ip = "127.0.0.1", ports = [{db_port}], proto = "tcp" }}]

[services.app]
cgroup = "{top}/app"
mode = "audit"
allow = [{{ service = "db" }}]
"#
    );
    std::fs::write(path, text).unwrap();
}

/// The value of a query's only sample.
fn only(samples: &[Sample]) -> Option<f64> {
    match samples {
        [(_, value)] => Some(*value),
        _ => None,
    }
}

#[test]
fn prometheus_sees_would_rejects_of_a_real_agent_and_raises_the_audit_alert() {
    let test = "prometheus_sees_would_rejects_of_a_real_agent_and_raises_the_audit_alert";
    if !depfence_integration::require_privileges(test) || require_tool(test, "prometheus").is_none() {
        return;
    }
    let started = Instant::now();
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (db, undeclared) = (tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_policy(&policy, &cgroups.relative(), db);
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, agent.metrics));
    let prometheus = Prometheus::start(&[target]).unwrap_or_else(|e| panic!("start prometheus: {e}"));
    println!("agent metrics on {target}; prometheus (pid {}) on {}", prometheus.pid(), prometheus.addr());
    let wait = |promql: &str, predicate: &dyn Fn(Option<f64>) -> bool| {
        prometheus
            .wait_for(promql, |samples| predicate(only(samples)), WAIT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()))
    };

    // Prometheus scrapes the agent, which reports app in audit.
    let up = wait(r#"up{job="depfence"}"#, &|v| v == Some(1.0));
    assert_eq!(up[0].0.get("instance"), Some(&target.to_string()), "{up:?}");
    wait(r#"depfence_service_mode{job="depfence",service="app",mode="audit"}"#, &|v| v == Some(1.0));
    wait(r#"depfence_service_mode{job="depfence",service="app",mode="enforce"}"#, &|v| v == Some(0.0));
    // A scraped zero first, so that increase() sees the connects below as a rise.
    let would_reject = r#"depfence_connections_total{job="depfence",service="app",verdict="would_reject"}"#;
    wait(would_reject, &|v| v == Some(0.0));

    // Real connects: the allowed one to db, then undeclared ones, which pass in audit.
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
    for _ in 0..UNDECLARED_CONNECTS {
        assert_eq!(probe(&app, "tcp", LO4, undeclared, 1), Ok(1), "app is in audit: the connect passes");
    }
    // The agent exports the kernel's exact counters every second; Prometheus scrapes them.
    wait(would_reject, &|v| v == Some(f64::from(UNDECLARED_CONNECTS)));
    wait(r#"depfence_connections_total{job="depfence",service="app",verdict="allowed"}"#, &|v| v == Some(1.0));
    wait(r#"depfence_connections_total{job="depfence",service="app",verdict="rejected"}"#, &|v| v == Some(0.0));
    let increase = prometheus.query(&format!("increase({would_reject}[1m]) > 0")).unwrap();
    assert_eq!(increase.len(), 1, "{increase:?}");

    // The shipped rule: app is in audit and its would-rejects grow, so the alert is pending (it
    // fires after its `for: 5m`).
    let alert = prometheus
        .wait_for_alert("DepfenceWouldRejectInAudit", WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_text()));
    println!("alert: {alert:?}");
    assert!(alert.state == "pending" || alert.state == "firing", "{alert:?}");
    assert_eq!((alert.label("service"), alert.label("severity")), ("app", "warning"), "{alert:?}");
    assert!(alert.value > 0.0, "{alert:?}");

    // Nothing else: the agent is up, its reload succeeded, nothing was rejected or dropped, and
    // the maps are far from full.
    let others = prometheus.other_alerts("DepfenceWouldRejectInAudit").unwrap();
    assert!(others.is_empty(), "{others:?}");
    println!("took {:?}", started.elapsed());
}
