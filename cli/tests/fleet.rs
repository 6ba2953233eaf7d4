//! The fleet gate against real parts: three real agents (each its own pin root, state directory,
//! socket, metrics port and cgroup subtree, `--cgroup-root`, as three hosts), real clients
//! connecting from each host's cgroup, and a real Prometheus scraping the agents.
//! `policyctl promote --prometheus` must promote when every host is clean and busy, and be
//! inconclusive when the window exceeds the retention, when a host runs another policy, when a
//! host stops reporting, and when Prometheus is down; refused (naming the host and destination)
//! when a host sees a would-reject. Run as root, with the Debian `prometheus` package.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, LO4, probe, tcp_listener};
use depfence_integration::prometheus::Prometheus;

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];
const WINDOW: &str = "12s";

fn policy_text(db: u16, extra: &str) -> String {
    format!(
        "version = 1\n[environments]\nprod = \"audit\"\n\n[services.db]\n\
         endpoints = [{{ ip = \"127.0.0.1\", ports = [{db}], proto = \"tcp\" }}]\n\n\
         # Policy paths are relative to each agent's --cgroup-root.\n[services.app]\ncgroup = \"app\"\n\
         allow = [{{ service = \"db\" }}]\n{extra}"
    )
}

fn promote(policy: &Path, url: &str, extra: &[&str]) -> Output {
    promote_over(policy, url, WINDOW, extra)
}

fn promote_over(policy: &Path, url: &str, window: &str, extra: &[&str]) -> Output {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
        .args(["promote", "app", "--enforce", "-e", "prod", "--prometheus", url, "--policy"])
        .arg(policy)
        .args(["--window", window, "--min-connections", "10", "--min-per-host", "3", "--timeout", "3s"])
        .args(extra)
        .output()
        .unwrap()
}

/// Runs the gate until it gives `code` with `text` in its output (the scrapes catch up), or fails
/// with the last answer.
fn until(what: &str, policy: &Path, url: &str, extra: &[&str], code: i32, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let out = promote(policy, url, extra);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() == Some(code) && stdout.contains(text) {
            return stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: wanted exit {code} with {text:?}, got {:?}:\n{stdout}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_fleet_gate_decides_on_every_host_evidence() {
    if !depfence_integration::require_privileges("the_fleet_gate_decides_on_every_host_evidence") {
        return;
    }
    if depfence_integration::prometheus::require_tool("the_fleet_gate_decides_on_every_host_evidence", "prometheus")
        .is_none()
    {
        return;
    }
    let policyctl = assert_cmd::cargo::cargo_bin("policyctl");
    let mut cgroups = Cgroup::new();
    let apps: Vec<PathBuf> = HOSTS
        .iter()
        .map(|h| {
            cgroups.child(h);
            cgroups.child(&format!("{h}/app"))
        })
        .collect();
    let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    // Each host's agent reads its own copy (so one host can run another policy); the checkout
    // the gate judges and rewrites is a fourth copy, with the same content.
    let text = policy_text(db, "");
    let files: Vec<PathBuf> = HOSTS.iter().map(|h| dir.path().join(format!("{h}.toml"))).collect();
    let checkout = dir.path().join("checkout");
    std::fs::create_dir(&checkout).unwrap();
    let checkout_policy = checkout.join("policy.toml");
    for file in files.iter().chain([&checkout_policy]) {
        std::fs::write(file, &text).unwrap();
    }
    let mut agents: Vec<Option<Agent>> = HOSTS
        .iter()
        .zip(&files)
        .map(|(h, file)| {
            let root = format!("{}/{h}", cgroups.relative());
            Some(Agent::start_with(&policyctl, file, "prod", &["--cgroup-root", &root]))
        })
        .collect();
    let targets: Vec<std::net::SocketAddr> =
        agents.iter().flatten().map(|a| format!("127.0.0.1:{}", a.metrics).parse().unwrap()).collect();
    let prometheus = Prometheus::start(&targets).unwrap();
    let url = format!("http://{}", prometheus.addr());

    // Clients on every host, without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = apps
        .iter()
        .cloned()
        .map(|app| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        })
        .collect();

    // Clean and busy everywhere: promoted (dry run first, then for real).
    let out = until("clean fleet", &checkout_policy, &url, &["--dry-run"], 0, "may be promoted");
    for host in &targets {
        assert!(out.contains(&format!("host {host}:")), "every host is listed: {out}");
    }
    // A window longer than Prometheus keeps samples (15 days by default): inconclusive.
    let out = promote_over(&checkout_policy, &url, "20d", &["--dry-run"]);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Prometheus keeps 15d of samples, less than the window of 20d"),
        "{out:?}"
    );

    // One host on another policy: inconclusive, naming it.
    std::fs::write(&files[2], policy_text(db, "[services.extra]\n")).unwrap();
    let out = until("another policy", &checkout_policy, &url, &["--dry-run"], 75, "hosts on another policy");
    assert!(out.contains(&targets[2].to_string()), "{out}");
    std::fs::write(&files[2], &text).unwrap();
    until("policy restored", &checkout_policy, &url, &["--dry-run"], 0, "may be promoted");

    // The real promotion: the checkout now enforces, and the log has the decision.
    let out = promote(&checkout_policy, &url, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let rewritten = std::fs::read_to_string(&checkout_policy).unwrap();
    assert!(rewritten.contains("mode = { prod = \"enforce\" }"), "{rewritten}");
    let log = std::fs::read_to_string(checkout.join("depfence-promotions.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["outcome"], "promoted");
    assert_eq!(last["dry_run"], false);
    assert!(last["queries"].as_array().unwrap().len() >= 6, "the queries and answers are kept: {last}");
    assert!(last["queries"][0]["answer"]["series"].is_array());
    std::fs::write(&checkout_policy, &text).unwrap();

    // One host stops reporting: inconclusive.
    agents[2] = None;
    let out = until("a silent host", &checkout_policy, &url, &["--dry-run"], 75, "agents that do not report");
    assert!(out.contains(&targets[2].to_string()), "{out}");

    // A would-reject on host-b: refused, naming the host and the destination.
    assert_eq!(probe(&apps[1], "tcp", LO4, other, 1), Ok(1), "audit lets it through");
    let out = until("a would-reject", &checkout_policy, &url, &["--dry-run"], 1, "would-rejects in the window");
    assert!(out.contains(&format!("{} (1)", targets[1])), "{out}");
    assert!(out.contains(&format!("127.0.0.1:{other}/tcp would-rejected (1 events) on {}", targets[1])), "{out}");

    // `learn` fleet-wide proposes the entry the would-reject asks for, naming the host that saw it.
    let out = std::process::Command::new(&policyctl)
        .args(["learn", "--policy"])
        .arg(&checkout_policy)
        .args(["--prometheus", &url, "-e", "prod", "--window", WINDOW])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(10), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(&format!(
            "propose for `app`: {{ ip = \"127.0.0.1\", ports = [{other}], proto = \"tcp\", reason = \"learned: 1 would-reject(s) on {}\" }}",
            targets[1]
        )),
        "{stdout}"
    );

    // `unused` fleet-wide, judged against a policy that also declares a backend nothing reaches:
    // `db`, hit on every host, is used; the other is listed.
    let judged = dir.path().join("judged.toml");
    let declared = text.replace(
        "allow = [{ service = \"db\" }]",
        "allow = [{ service = \"db\" }, { ip = \"127.0.0.9\", ports = [9], proto = \"tcp\" }]",
    );
    assert_ne!(declared, text);
    std::fs::write(&judged, declared).unwrap();
    let out = std::process::Command::new(&policyctl)
        .args(["unused", "--prometheus", &url, "--policy"])
        .arg(&judged)
        .args(["-e", "prod", "--window", WINDOW])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(10), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("unused dependency: `app` -> `127.0.0.9/32`"), "{stdout}");
    assert!(!stdout.contains("`db`"), "{stdout}");

    // A host that never reported (a target that was never up): inconclusive, from a second
    // Prometheus that also scrapes it.
    let never: std::net::SocketAddr =
        format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port())
            .parse()
            .unwrap();
    let with_never = Prometheus::start(&[targets[0], targets[1], never]).unwrap();
    let out = until(
        "a host that never reported",
        &checkout_policy,
        &format!("http://{}", with_never.addr()),
        &["--dry-run"],
        75,
        &format!("agents that do not report: {never}"),
    );
    assert!(out.contains("inconclusive"), "{out}");
    drop(with_never);

    // Prometheus down: inconclusive.
    drop(prometheus);
    let out = promote(&checkout_policy, &url, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Prometheus does not answer"), "{out:?}");

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
}
