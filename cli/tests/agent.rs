//! `policyctl agent` on a real kernel (root): a real agent process, real cgroups, real clients
//! (curl and the probe) on loopback. Skips with a reason elsewhere; under CI a skip is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use depfence::agent::control::{AgentStatus, ServiceStatus};
use depfence::cgroup::spawn_in;
use depfence_integration::agent::Agent;
use depfence_integration::fixture::{Cgroup, EPERM, LO4, probe, tcp_listener};

fn privileged(test: &str) -> bool {
    depfence_integration::require_privileges(test)
}

fn write_policy(path: &Path, top: &str, mode: &str, db_port: u16) {
    let text = format!(
        r#"version = 1
# test policy
[environments]
prod = "audit"
qa = "enforce"

[services.db]
endpoints = [{{ ip = "127.0.0.1", ports = [{db_port}], proto = "tcp" }}]

[services.app]
cgroup = "{top}/app"
mode = "{mode}"
allow = [{{ service = "db" }}]

[services.batch]
cgroup = {{ regex = "{top}/batch-[0-9]+" }}
allow = [{{ service = "db" }}]
"#
    );
    // Write and rename, as editors and config management do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Test cgroups with `app`, a `db` server the policy allows and another it does not, and the
/// policy file (app in `mode`).
struct Setup {
    cgroups: Cgroup,
    app: PathBuf,
    db: u16,
    other: u16,
    dir: tempfile::TempDir,
    policy: PathBuf,
}

impl Setup {
    fn new(mode: &str) -> Self {
        let mut cgroups = Cgroup::new();
        let app = cgroups.child("app");
        let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        write_policy(&policy, &cgroups.relative(), mode, db);
        Self { cgroups, app, db, other, dir, policy }
    }
}

fn service<'a>(status: &'a AgentStatus, name: &str) -> Option<&'a ServiceStatus> {
    status.services.iter().find(|s| s.name == name)
}

/// Enforce and audit from the policy, a cgroup created after the start (within a second), an
/// invalid policy that changes nothing (proven by real connects), a valid edit applied at once,
/// and the metrics, status and events that report all of it.
#[test]
fn agent_applies_reloads_and_keeps_the_last_good_policy() {
    if !privileged("agent_applies_reloads_and_keeps_the_last_good_policy") {
        return;
    }
    let Setup { mut cgroups, app, db, other, dir: _dir, policy } = Setup::new("enforce");
    let mut agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");

    // app enforces (its own mode), the allowed dependency works.
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
    let status = agent.wait_status("app counted", |s| service(s, "app").is_some_and(|a| a.counts.rejected == 1));
    let app_status = service(&status, "app").unwrap();
    assert_eq!((app_status.mode.as_str(), app_status.counts.allowed), ("enforce", 1));
    assert_eq!(status.generation, 1);

    // The agent publishes the snapshot in force for in-process guards.
    let published = || {
        let path = agent.state_dir().join(depfence::snapshot::AGENT_SNAPSHOT_FILE);
        let snapshot = depfence::snapshot::Snapshot::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o644, "readable by unprivileged services");
        snapshot.hash().to_string()
    };
    assert_eq!(Some(published()), status.policy_hash);
    let guard = depfence::guard::Guard::from_agent(agent.state_dir(), "prod").unwrap();
    let _watch = guard.watch(Duration::from_millis(50)).unwrap();
    assert_eq!(Some(guard.snapshot_hash().to_string()), status.policy_hash);

    // A cgroup that appears later is under its service's policy within a second.
    let created = Instant::now();
    let batch = cgroups.child("batch-7");
    agent.wait_status("batch-7 registered", |s| service(s, "batch").is_some());
    let took = created.elapsed();
    assert!(took < Duration::from_secs(1), "registered after {took:?}");
    assert_eq!(probe(&batch, "tcp", LO4, other, 1), Ok(1), "batch is in audit (the environment's default)");
    let status =
        agent.wait_status("batch would-reject", |s| service(s, "batch").is_some_and(|b| b.counts.would_reject == 1));
    let last = service(&status, "batch").unwrap().last_would_reject.clone().unwrap();
    assert_eq!(
        (last.destination.as_str(), last.comm.as_str()),
        (format!("127.0.0.1:{other}/tcp").as_str(), "depfence-probe")
    );

    // An invalid policy: rejected with its location, nothing changes in the kernel.
    std::fs::write(
        &policy,
        std::fs::read_to_string(&policy).unwrap().replace("mode = \"enforce\"", "mode = \"enforse\""),
    )
    .unwrap();
    let status = agent.wait_status("reload failure reported", |s| s.last_reload.as_ref().is_some_and(|r| !r.ok));
    let errors = &status.last_reload.as_ref().unwrap().errors;
    assert!(errors.iter().any(|e| e.contains("policy.toml:12:8") && e.contains("enforse")), "{errors:?}");
    assert_eq!(status.generation, 1);
    assert_eq!(Some(published()), status.policy_hash, "an invalid policy is never published");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM), "the last good policy is still enforced");
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
    assert_eq!(agent.sample("depfence_policy_last_reload_successful"), Some(0.0));
    assert_eq!(agent.sample("depfence_policy_reloads_total{result=\"failure\"}"), Some(1.0));
    assert!(agent.log_text().contains("policy.toml:12:8"), "the log names the place");

    // A valid edit (app to audit) is applied at once.
    write_policy(&policy, &cgroups.relative(), "audit", db);
    let status =
        agent.wait_status("generation 2", |s| s.generation == 2 && s.last_reload.as_ref().is_some_and(|r| r.ok));
    // The snapshot is published by a thread of its own after the apply: soon, and whole.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Some(published()) != status.policy_hash || Some(guard.snapshot_hash().to_string()) != status.policy_hash {
        assert!(Instant::now() < deadline, "the agent's new snapshot was not published, or the guard did not follow");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1), "now in audit");
    let status =
        agent.wait_status("app would-reject", |s| service(s, "app").is_some_and(|a| a.counts.would_reject == 1));
    let app_status = service(&status, "app").unwrap();
    assert_eq!((app_status.mode.as_str(), app_status.counts.rejected, app_status.counts.allowed), ("audit", 2, 2));

    // The metrics say the same.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(agent.sample("depfence_connections_total{service=\"app\",verdict=\"rejected\"}"), Some(2.0));
    assert_eq!(agent.sample("depfence_connections_total{service=\"app\",verdict=\"would_reject\"}"), Some(1.0));
    assert_eq!(agent.sample("depfence_service_mode{service=\"app\",mode=\"audit\"}"), Some(1.0));
    assert_eq!(agent.sample("depfence_policy_generation"), Some(2.0));
    // After a reload the snapshot is published by a thread of its own: soon, and whole.
    let deadline = Instant::now() + Duration::from_secs(10);
    let in_force = agent.status().policy_hash;
    while Some(published()) != in_force || Some(guard.snapshot_hash().to_string()) != in_force {
        assert!(
            Instant::now() < deadline,
            "the reloaded policy's snapshot was not published, or the guard did not follow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(agent.sample("depfence_policy_last_reload_successful"), Some(1.0));
    for stage in ["compile", "apply"] {
        let took = agent.sample(&format!("depfence_policy_last_reload_duration_seconds{{stage=\"{stage}\"}}"));
        assert!(took.is_some_and(|t| t > 0.0 && t < 60.0), "{stage}: {took:?}\n{}", agent.metrics());
    }
    let dest = format!(
        "depfence_destination_events_total{{service=\"batch\",destination=\"127.0.0.1:{other}/tcp\",verdict=\"would_reject\"}}"
    );
    assert_eq!(agent.sample(&dest), Some(1.0));

    // policyctl events shows them with the process.
    let out = Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
        .args(["events", "--json", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|e| e["verdict"] == "rejected" && e["service"] == "app"), "{lines:?}");

    // A removed cgroup leaves the policy.
    cgroups.remove_last_child();
    agent.wait_status("batch gone", |s| service(s, "batch").is_none());
    agent.kill9();
}

/// kill -9 of the agent: enforcement never lapses, and the restarted agent adopts the pins
/// and carries the counters on.
#[test]
fn enforcement_survives_agent_kill_and_restart_keeps_counters() {
    if !privileged("enforcement_survives_agent_kill_and_restart_keeps_counters") {
        return;
    }
    let Setup { cgroups: _cgroups, app, db, other, dir: _dir, policy } = Setup::new("enforce");
    let mut agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
    agent.wait_status("counted", |s| service(s, "app").is_some_and(|a| a.counts.rejected == 1));
    let since = service(&agent.status(), "app").unwrap().mode_since.clone();

    agent.kill9();
    // A client that keeps connecting while the agent is dead never gets through.
    let client = spawn_in(
        &app,
        Command::new(depfence_integration::fixture::crate_binary("depfence-probe"))
            .args(["tally", "127.0.0.1", &other.to_string(), "200"])
            .stdout(Stdio::piped()),
    )
    .unwrap();
    let tally = String::from_utf8(client.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(tally.trim(), "tally 0 200 0", "every connect refused while the agent was down");
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));

    let started = Instant::now();
    agent.spawn(&policy, "prod");
    eprintln!("restart to ready: {:?}", started.elapsed());
    let status = agent.status();
    let app_status = service(&status, "app").unwrap();
    assert_eq!((app_status.counts.rejected, app_status.counts.allowed), (201, 1), "counters carried on");
    assert_eq!(status.generation, 1, "same policy, same generation");
    assert_eq!(app_status.mode_since, since, "a restart is not a mode change");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
}

/// Tests run in parallel and their clients take ephemeral ports, so the metrics port chosen for
/// an agent can be taken before the agent binds it: the agent exits naming the address, and
/// the fixture starts it again on another port instead of failing the test.
#[test]
fn an_agent_whose_metrics_port_was_taken_starts_on_another() {
    if !privileged("an_agent_whose_metrics_port_was_taken_starts_on_another") {
        return;
    }
    let Setup { cgroups: _cgroups, app: _app, db: _db, other: _other, dir: _dir, policy } = Setup::new("audit");
    let mut agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    agent.stop();
    let taken = std::net::TcpListener::bind(("127.0.0.1", agent.metrics)).unwrap();
    agent.spawn(&policy, "prod");
    assert_ne!(agent.metrics, taken.local_addr().unwrap().port(), "started on another port");
    assert!(agent.metrics().contains("depfence_"), "it serves metrics there: {}", agent.metrics());
}

fn policyctl(args: &[&str], socket: &Path) -> std::process::Output {
    Command::new(assert_cmd::cargo::cargo_bin("policyctl")).args(args).arg("--socket").arg(socket).output().unwrap()
}

/// A candidate policy is evaluated in the kernel beside the active one: the active verdict
/// stands, the candidate's would-rejects are counted; activating it makes it the policy.
#[test]
fn candidate_policy_is_shadowed_then_activated() {
    if !privileged("candidate_policy_is_shadowed_then_activated") {
        return;
    }
    let Setup { cgroups, app, db, other: cache, dir, policy } = Setup::new("enforce");
    // The candidate moves app from db to cache.
    let candidate = dir.path().join("candidate.toml");
    write_policy(&candidate, &cgroups.relative(), "enforce", cache);
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");

    let out = policyctl(&["apply", "--candidate", candidate.to_str().unwrap()], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1), "the active policy decides");
    assert_eq!(probe(&app, "tcp", LO4, cache, 1), Err(EPERM));
    let status = agent.wait_status("candidate counted", |s| {
        service(s, "app").is_some_and(|a| a.counts.candidate_would_reject == 1 && a.counts.rejected == 1)
    });
    assert!(status.candidate.is_some());
    let text = String::from_utf8(policyctl(&["status"], &agent.socket).stdout).unwrap();
    assert!(text.contains("1 candidate would-reject"), "{text}");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(agent.sample("depfence_candidate_would_reject_total{service=\"app\"}"), Some(1.0));

    let out = policyctl(&["apply", "--activate"], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), std::fs::read_to_string(&candidate).unwrap());
    let status = agent.status();
    assert!(status.candidate.is_none());
    assert_eq!(status.generation, 2);
    assert_eq!(probe(&app, "tcp", LO4, cache, 1), Ok(1), "the candidate is the policy now");
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Err(EPERM));

    // A candidate that is not valid is refused with its location.
    std::fs::write(&candidate, "version = 1\n[services.app]\nallow = [{ service = \"nope\" }]\n").unwrap();
    let out = policyctl(&["apply", "--candidate", candidate.to_str().unwrap()], &agent.socket);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("candidate.toml:3:") && stderr.contains("nope"), "{stderr}");
}

/// `promote --enforce` is refused while the evidence shows would-rejects (or too little
/// traffic), accepted when it is clean; the policy file is rewritten with its comments, the
/// agent applies it at once, and every change is logged with who and why.
#[test]
fn promotion_is_gated_on_evidence_and_logged() {
    if !privileged("promotion_is_gated_on_evidence_and_logged") {
        return;
    }
    let Setup { mut cgroups, app, db, other, dir: _dir, policy } = Setup::new("audit");
    let batch = cgroups.child("batch-1");
    let gate = ["--promote-window", "30s", "--promote-min-observed", "1s", "--promote-min-connections", "5"];
    let agent = Agent::start_with(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod", &gate);

    // Too little traffic yet.
    let out = policyctl(&["promote", "batch", "--enforce"], &agent.socket);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("promotion refused"), "{out:?}");

    // app makes one undeclared connection; batch only declared ones.
    assert_eq!(probe(&app, "tcp", LO4, db, 5), Ok(5));
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1));
    assert_eq!(probe(&batch, "tcp", LO4, db, 6), Ok(6));
    agent.wait_status("counted", |s| service(s, "app").is_some_and(|a| a.counts.would_reject == 1));
    std::thread::sleep(Duration::from_millis(2200)); // two samples a second apart
    let before = std::fs::read_to_string(&policy).unwrap();

    let out = policyctl(&["promote", "app", "--enforce"], &agent.socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("app had 1 would-rejected connection in the last 30s")
            && stderr.contains(&format!("127.0.0.1:{other}/tcp (1)")),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), before, "a refusal changes nothing");

    // --force needs a reason (clap refuses), and with one it goes through, logged as forced.
    assert_eq!(policyctl(&["promote", "app", "--enforce", "--force"], &agent.socket).status.code(), Some(2));

    // --dry-run checks the evidence only.
    let out = policyctl(&["promote", "app", "--enforce", "--dry-run"], &agent.socket);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("promotion would be refused: app had 1"), "{out:?}");
    let out = policyctl(&["promote", "batch", "--enforce", "--dry-run"], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch may be promoted: 6 connections"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), before, "a dry run changes nothing");

    let out = policyctl(&["promote", "batch", "--enforce"], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&policy).unwrap();
    assert!(text.contains("# test policy"), "comments kept:\n{text}");
    assert!(text.contains("mode = { prod = \"enforce\" }"), "{text}");
    let status = agent.status();
    assert_eq!(service(&status, "batch").unwrap().mode, "enforce");
    assert_eq!(probe(&batch, "tcp", LO4, other, 1), Err(EPERM), "enforced at once");

    let out = policyctl(
        &["promote", "app", "--enforce", "--force", "--reason", "INC-42: other is a known cache"],
        &agent.socket,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("forced past the evidence gate"));
    let out = policyctl(&["demote", "batch", "--reason", "rollback drill"], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(probe(&batch, "tcp", LO4, other, 1), Ok(1), "back in audit");

    let log = depfence::promote::read_log(&agent.state_dir().join("promotions.jsonl")).unwrap();
    let summary: Vec<(&str, &str, bool, Option<&str>)> =
        log.iter().map(|r| (r.service.as_str(), r.who.user.as_str(), r.forced, r.reason.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("batch", "root", false, None),
            ("app", "root", true, Some("INC-42: other is a known cache")),
            ("batch", "root", false, Some("rollback drill")),
        ]
    );
    assert!(log[1].overridden.as_deref().is_some_and(|o| o.contains("would-rejected")));
    assert_eq!(log[0].to, depfence::policy::Mode::Enforce);
    assert_eq!(log[2].to, depfence::policy::Mode::Audit);
}

/// `events --follow` streams new events as they happen; `explain --live` judges against the
/// policy in force.
#[test]
fn events_follow_and_live_explain() {
    if !privileged("events_follow_and_live_explain") {
        return;
    }
    let Setup { cgroups: _cgroups, app, db, other, dir: _dir, policy } = Setup::new("enforce");
    let agent = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    let mut follow = Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
        .args(["events", "--follow", "--json", "--recent", "0", "--socket"])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(follow.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    follow.kill().unwrap();
    follow.wait().unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["verdict"], "rejected");
    assert_eq!(event["service"], "app");
    assert_eq!(event["destination"], format!("127.0.0.1:{other}/tcp"));
    assert_eq!(event["comm"], "depfence-probe");

    let out = policyctl(&["explain", "--live", "--from", "app", "--to", &format!("127.0.0.1:{db}")], &agent.socket);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("allowed") && text.contains("policy.toml:"), "{text}");
    let out = policyctl(
        &["explain", "--live", "--from", "app", "--to", &format!("127.0.0.1:{other}"), "--output", "json"],
        &agent.socket,
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Live and offline explain give one shape: the verdict of each environment asked about (the
    // agent's one, live), and the generation that answered.
    let verdict = &body["judgements"][0]["verdicts"][0];
    assert_eq!((verdict["verdict"].as_str(), verdict["mode"].as_str()), (Some("rejected"), Some("enforce")));
    assert_eq!(body["live"]["generation"], 1);

    // SIGHUP re-reads the policy (the same one: same generation).
    let status = Command::new("kill").args(["-HUP", &agent.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.log_text().contains("reason=\"SIGHUP\"") {
        assert!(Instant::now() < deadline, "no reload on SIGHUP:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agent.status().generation, 1);
}

/// A policy that is a directory of team files: an edit to one file is applied, and a
/// promotion rewrites the file that defines the service.
#[test]
fn directory_policy_reloads_and_promotes_in_the_right_file() {
    if !privileged("directory_policy_reloads_and_promotes_in_the_right_file") {
        return;
    }
    let mut cgroups = Cgroup::new();
    let app = cgroups.child("app");
    let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let top = cgroups.relative();
    std::fs::write(dir.path().join("00-global.toml"), "version = 1\n[environments]\nprod = \"audit\"\n").unwrap();
    let db_file = dir.path().join("10-db.toml");
    std::fs::write(
        &db_file,
        format!("version = 1\n[services.db]\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{db}] }}]\n"),
    )
    .unwrap();
    let app_file = dir.path().join("20-app.toml");
    std::fs::write(
        &app_file,
        format!("version = 1\n# team app\n[services.app]\ncgroup = \"{top}/app\"\nallow = [{{ service = \"db\" }}]\n"),
    )
    .unwrap();
    let gate = ["--promote-window", "30s", "--promote-min-observed", "1s", "--promote-min-connections", "2"];
    let agent = Agent::start_with(&assert_cmd::cargo::cargo_bin("policyctl"), dir.path(), "prod", &gate);
    assert_eq!(probe(&app, "tcp", LO4, db, 3), Ok(3));

    // An edit in the db team's file (a second port) is applied at once.
    std::fs::write(
        &db_file,
        format!("version = 1\n[services.db]\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{db}, {other}] }}]\n"),
    )
    .unwrap();
    agent.wait_status("generation 2", |s| s.generation == 2);
    std::thread::sleep(Duration::from_millis(2200));
    let out = policyctl(&["promote", "app", "--enforce"], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let app_text = std::fs::read_to_string(&app_file).unwrap();
    assert!(app_text.contains("# team app") && app_text.contains("mode = { prod = \"enforce\" }"), "{app_text}");
    assert!(!std::fs::read_to_string(&db_file).unwrap().contains("mode"), "only the app team's file changes");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1), "the second db port is allowed");
    let stray = tcp_listener(LO4);
    assert_eq!(probe(&app, "tcp", LO4, stray, 1), Err(EPERM), "enforced");
}

/// The issue's scenario on a real kernel: an agent in audit saw a would-reject; it was killed,
/// its counter history truncated and its kernel state file corrupted, and it was restarted on
/// the same pins. The restarted agent keeps the service's counter slot (read back from
/// `DF_CGROUPS`: the counters carry on), reports the damaged file, and refuses the promotion
/// because the evidence was lost.
#[test]
fn lost_evidence_refuses_a_promotion_after_a_restart() {
    if !privileged("lost_evidence_refuses_a_promotion_after_a_restart") {
        return;
    }
    let Setup { cgroups: _cgroups, app, db, other, dir: _dir, policy } = Setup::new("audit");
    let gate = ["--promote-window", "30s", "--promote-min-observed", "1s", "--promote-min-connections", "3"];
    let mut agent = Agent::start_with(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod", &gate);
    assert_eq!(probe(&app, "tcp", LO4, db, 3), Ok(3));
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1), "audit lets it through");
    agent.wait_status("would-reject counted", |s| service(s, "app").is_some_and(|a| a.counts.would_reject == 1));
    std::thread::sleep(Duration::from_millis(1100));

    agent.kill9();
    let history = agent.state_dir().join("counter-history.jsonl");
    let text = std::fs::read(&history).unwrap();
    std::fs::write(&history, &text[..text.len() / 3]).unwrap();
    std::fs::write(agent.state_dir().join("kernel-state.json"), "{\"slots\": {\"app\": ").unwrap();
    agent.spawn(&policy, "prod");

    let status = agent.status();
    let app_status = service(&status, "app").unwrap();
    assert_eq!((app_status.counts.would_reject, app_status.counts.allowed), (1, 3), "the slot's counters carry on");
    assert_eq!((app_status.mode.as_str(), app_status.mode_since.as_str()), ("audit", "unknown"));
    let log = agent.log_text();
    assert!(log.contains("kernel-state.json` is damaged at line 1 column"), "{log}");
    assert!(log.contains("counter-history.jsonl` line "), "the cut history is reported too: {log}");
    assert_eq!(
        agent.sample("depfence_state_file_errors_total{file=\"kernel-state.json\",kind=\"corrupt\"}"),
        Some(1.0)
    );

    assert_eq!(probe(&app, "tcp", LO4, db, 3), Ok(3));
    std::thread::sleep(Duration::from_millis(2200));
    let before = std::fs::read_to_string(&policy).unwrap();
    let out = policyctl(&["promote", "app", "--enforce"], &agent.socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the evidence for app was lost"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), before, "a refusal changes nothing");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1), "still in audit");
}

/// A read-only bind mount over a directory, undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn over(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let status = Command::new("mount").args(args).arg(dir).arg(dir).status().unwrap();
            assert!(status.success(), "mount {args:?} {}", dir.display());
        };
        run(&["--bind"]);
        let guard = ReadOnly(dir.to_owned());
        let status = Command::new("mount").args(["-o", "remount,bind,ro"]).arg(dir).status().unwrap();
        assert!(status.success(), "remount read-only {}", dir.display());
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        match Command::new("umount").arg("-l").arg(&self.0).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("cleanup: umount {}: {other:?}", self.0.display()),
        }
    }
}

/// The state directory goes read-only under a running agent (a bind mount, so files the agent
/// already has open stay as they are). A policy edit is applied, in force and reported so; the
/// failed writes are logged and counted; the metrics go on; a promotion is refused with the
/// reason; once the directory is writable again, the promotion goes through.
#[test]
fn a_read_only_state_directory_keeps_enforcing_and_refuses_promotions() {
    if !privileged("a_read_only_state_directory_keeps_enforcing_and_refuses_promotions") {
        return;
    }
    let Setup { mut cgroups, app, db, other, dir: _dir, policy } = Setup::new("audit");
    let batch = cgroups.child("batch-1");
    let gate = ["--promote-window", "30s", "--promote-min-observed", "1s", "--promote-min-connections", "3"];
    let agent = Agent::start_with(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod", &gate);
    assert_eq!(probe(&batch, "tcp", LO4, db, 3), Ok(3));
    std::thread::sleep(Duration::from_millis(2200));

    let read_only = ReadOnly::over(agent.state_dir());
    assert!(std::fs::write(agent.state_dir().join("probe"), "x").is_err(), "the state directory is read-only");
    write_policy(&policy, &cgroups.relative(), "enforce", db);
    let status =
        agent.wait_status("generation 2", |s| s.generation == 2 && s.last_reload.as_ref().is_some_and(|r| r.ok));
    assert_eq!(service(&status, "app").unwrap().mode, "enforce", "reported as in force");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM), "and in force");
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
    std::thread::sleep(Duration::from_millis(1100));
    let written =
        |file: &str| agent.sample(&format!("depfence_state_file_errors_total{{file=\"{file}\",kind=\"write\"}}"));
    assert!(written("kernel-state.json") >= Some(1.0), "{}", agent.metrics());
    assert!(written("snapshot.bin") >= Some(1.0));
    assert_eq!(agent.sample("depfence_policy_generation"), Some(2.0), "the metrics go on");
    let log = agent.log_text();
    assert!(log.contains("kernel-state.json") && log.contains("Read-only file system"), "{log}");

    let before = std::fs::read_to_string(&policy).unwrap();
    let out = policyctl(&["promote", "batch", "--enforce"], &agent.socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("promotion refused: the state directory is not writable: ")
            && stderr.contains("Read-only file system")
            && stderr.contains("; evidence cannot be recorded"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&policy).unwrap(), before, "a refusal changes nothing");

    drop(read_only);
    let out = policyctl(&["promote", "batch", "--enforce"], &agent.socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(probe(&batch, "tcp", LO4, other, 1), Err(EPERM), "promoted and enforced");
}

/// A `policyctl agent` process beside the fixture's, killed on drop.
struct Other {
    child: std::process::Child,
    state: PathBuf,
    log: PathBuf,
}

impl Other {
    /// Starts an agent with `policy` on the pin root `pins` and the state directory `state`
    /// (its socket in it, its log beside it, no metrics).
    fn start(policy: &Path, pins: &Path, state: &Path, extra: &[&str]) -> Self {
        let log = state.with_extension("log");
        let child = Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
            .arg("agent")
            .arg(policy)
            .args(["--environment", "prod", "--metrics-listen", "none", "--pin-root"])
            .arg(pins)
            .arg("--state-dir")
            .arg(state)
            .arg("--socket")
            .arg(state.join("control.sock"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Other { child, state: state.to_owned(), log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&self) -> AgentStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let request = depfence::agent::control::Request::Status;
            if let Ok(body) = depfence::agent::control::request(&self.state.join("control.sock"), &request) {
                let status: AgentStatus = serde_json::from_value(body).unwrap();
                if status.ready {
                    return status;
                }
            }
            assert!(Instant::now() < deadline, "not ready; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Other {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One agent per pin root (and per state directory): a second agent on the same pins with
/// another policy refuses to start and names the holder, while the first one's policy stays in
/// force; a restart that overlaps the old agent waits for it to exit; `--takeover` stops the
/// holder and takes over. Never two at once.
#[test]
fn a_second_agent_on_the_same_pins_refuses_waits_or_takes_over() {
    if !privileged("a_second_agent_on_the_same_pins_refuses_waits_or_takes_over") {
        return;
    }
    let Setup { cgroups, app, db, other, dir, policy } = Setup::new("enforce");
    let mut first = Agent::start(&assert_cmd::cargo::cargo_bin("policyctl"), &policy, "prod");
    let pins = first.pins().root().to_owned();
    // The other agents' policy puts app in audit: while it is in force, `other` gets through.
    let audit = dir.path().join("audit.toml");
    write_policy(&audit, &cgroups.relative(), "audit", db);
    let states = tempfile::tempdir().unwrap();
    let (second_state, third_state) = (states.path().join("second"), states.path().join("third"));

    // Refused, naming the holder; the first agent's policy stays in force, and in its status.
    let mut refused = Other::start(&audit, &pins, &second_state, &["--lock-wait", "1s"]);
    let exit = refused.wait_exit();
    let log = refused.log_text();
    assert_eq!(exit.code(), Some(64), "{log}");
    assert!(
        log.contains(&format!(
            "another agent (pid {}) holds `{}` and did not exit within 1s",
            first.pid(),
            pins.display()
        )),
        "{log}"
    );
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM), "the first agent's policy is in force");
    assert_eq!(service(&first.status(), "app").unwrap().mode, "enforce");

    // A restart that overlaps the old agent waits for it to exit, then runs.
    let mut second = Other::start(&audit, &pins, &second_state, &["--lock-wait", "20s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.log_text().contains("waiting up to 20s") {
        assert!(Instant::now() < deadline, "{}", second.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(second.child.try_wait().unwrap().is_none(), "it waits");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM), "meanwhile the first one's policy is in force");
    assert!(first.stop().success());
    let status = second.wait_ready();
    assert_eq!(service(&status, "app").unwrap().mode, "audit");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1), "the second agent's policy is in force now");

    // --takeover stops the holder (SIGTERM: a clean exit) and takes over.
    let third = Other::start(&policy, &pins, &third_state, &["--takeover", "--lock-wait", "10s"]);
    let status = third.wait_ready();
    assert!(second.wait_exit().success(), "{}", second.log_text());
    assert!(third.log_text().contains(&format!("pid={}", second.child.id())), "{}", third.log_text());
    assert_eq!(service(&status, "app").unwrap().mode, "enforce");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));

    // A state directory has one agent too, whatever its pins.
    let (bpffs, _) = depfence::datapath::pins::ensure_bpffs().unwrap();
    let other_pins = depfence::datapath::pins::PinLayout::new(
        bpffs.join(format!("depfence-test-agent-{}", depfence::datapath::pins::random_suffix())),
    );
    let mut shared = Other::start(&policy, other_pins.root(), &third_state, &["--lock-wait", "0s"]);
    let exit = shared.wait_exit();
    let log = shared.log_text();
    other_pins.remove_all().unwrap();
    assert_eq!(exit.code(), Some(64), "{log}");
    let holder = format!("another agent (pid {}) holds `{}`", third.child.id(), third_state.display());
    assert!(log.contains(&holder), "{log}");
}
