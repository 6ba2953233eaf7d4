//! `policyctl agent` on a real kernel (root): a real agent process, real cgroups, real clients
//! (curl and the probe) on loopback. Skips with a reason elsewhere; under CI a skip is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use depfence::agent::control::{self, AgentStatus, Request, ServiceStatus};
use depfence::cgroup::{ChildCgroup, spawn_in};
use depfence::datapath::pins::{PinLayout, ensure_bpffs, random_suffix};
use depfence_integration::fixture::{EPERM, LO4, cgroup2_root, probe, tcp_listener};

fn privileged(test: &str) -> bool {
    depfence_integration::require_privileges(test)
}

/// A running `policyctl agent` with its own pins, state, socket and metrics port; stopped
/// (SIGKILL by PID) and its pins removed on drop.
struct Agent {
    child: Option<Child>,
    pins: PinLayout,
    state: tempfile::TempDir,
    socket: PathBuf,
    metrics: u16,
    log: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Agent {
    fn start(policy: &Path, environment: &str) -> Self {
        let (bpffs, _) = ensure_bpffs().unwrap();
        let pins = PinLayout::new(bpffs.join(format!("depfence-test-agent-{}", random_suffix())));
        let state = tempfile::tempdir().unwrap();
        let socket = state.path().join("control.sock");
        let mut agent =
            Agent { child: None, pins, socket, metrics: free_port(), log: state.path().join("agent.log"), state };
        agent.spawn(policy, environment);
        agent
    }

    fn spawn(&mut self, policy: &Path, environment: &str) {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(assert_cmd::cargo::cargo_bin("policyctl"))
            .arg("agent")
            .arg(policy)
            .args(["--environment", environment, "--metrics-listen", &format!("127.0.0.1:{}", self.metrics)])
            .arg("--pin-root")
            .arg(self.pins.root())
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--socket")
            .arg(&self.socket)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.try_status().is_ok_and(|s| s.ready) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready in 20 s; log:\n{}", self.log_text());
    }

    fn try_status(&self) -> Result<AgentStatus, control::ClientError> {
        let body = control::request(&self.socket, &Request::Status)?;
        Ok(serde_json::from_value(body).unwrap())
    }

    fn status(&self) -> AgentStatus {
        self.try_status().unwrap_or_else(|e| panic!("status: {e}; log:\n{}", self.log_text()))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The metrics page.
    fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    /// The value of one sample line of the metrics page (`name{labels}`), or None.
    fn sample(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// Waits until `check` holds for the status (the agent works in 100 ms – 1 s ticks).
    fn wait_status(&self, what: &str, check: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let status = self.status();
            if check(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "{what}: {status:#?}\nlog:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = self.pins.remove_all() {
            eprintln!("cleanup: pins {}: {e}", self.pins.root().display());
        }
    }
}

/// The test's cgroups: `depfence-test-agent-<rand>/…` under the cgroup2 root, removed on drop.
struct Cgroups {
    top: ChildCgroup,
    children: Vec<ChildCgroup>,
}

impl Cgroups {
    fn new() -> Self {
        let top =
            ChildCgroup::create(&cgroup2_root().unwrap(), &format!("depfence-test-agent-{}", random_suffix())).unwrap();
        Self { top, children: Vec::new() }
    }
    /// Path of the top relative to the cgroup2 mount.
    fn relative(&self) -> String {
        self.top.dir().file_name().unwrap().to_string_lossy().into_owned()
    }
    fn child(&mut self, name: &str) -> PathBuf {
        let child = ChildCgroup::create(self.top.dir(), name).unwrap();
        let dir = child.dir().to_owned();
        self.children.push(child);
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = self.top.kill_all();
        while let Some(child) = self.children.pop() {
            if let Err(e) = child.remove() {
                eprintln!("cleanup: {e}");
            }
        }
    }
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
    let mut cgroups = Cgroups::new();
    let app = cgroups.child("app");
    let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_policy(&policy, &cgroups.relative(), "enforce", db);
    let mut agent = Agent::start(&policy, "prod");

    // app enforces (its own mode), the allowed dependency works.
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
    let status = agent.wait_status("app counted", |s| service(s, "app").is_some_and(|a| a.rejected == 1));
    let app_status = service(&status, "app").unwrap();
    assert_eq!((app_status.mode.as_str(), app_status.allowed), ("enforce", 1));
    assert_eq!(status.generation, 1);

    // A cgroup that appears later is under its service's policy within a second.
    let created = Instant::now();
    let batch = cgroups.child("batch-7");
    agent.wait_status("batch-7 registered", |s| service(s, "batch").is_some());
    let took = created.elapsed();
    assert!(took < Duration::from_secs(1), "registered after {took:?}");
    assert_eq!(probe(&batch, "tcp", LO4, other, 1), Ok(1), "batch is in audit (the environment's default)");
    let status = agent.wait_status("batch would-reject", |s| service(s, "batch").is_some_and(|b| b.would_reject == 1));
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
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM), "the last good policy is still enforced");
    assert_eq!(probe(&app, "tcp", LO4, db, 1), Ok(1));
    assert_eq!(agent.sample("depfence_policy_last_reload_successful"), Some(0.0));
    assert_eq!(agent.sample("depfence_policy_reloads_total{result=\"failure\"}"), Some(1.0));
    assert!(agent.log_text().contains("policy.toml:12:8"), "the log names the place");

    // A valid edit (app to audit) is applied at once.
    write_policy(&policy, &cgroups.relative(), "audit", db);
    agent.wait_status("generation 2", |s| s.generation == 2 && s.last_reload.as_ref().is_some_and(|r| r.ok));
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Ok(1), "now in audit");
    let status = agent.wait_status("app would-reject", |s| service(s, "app").is_some_and(|a| a.would_reject == 1));
    let app_status = service(&status, "app").unwrap();
    assert_eq!((app_status.mode.as_str(), app_status.rejected, app_status.allowed), ("audit", 2, 2));

    // The metrics say the same.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(agent.sample("depfence_connections_total{service=\"app\",verdict=\"rejected\"}"), Some(2.0));
    assert_eq!(agent.sample("depfence_connections_total{service=\"app\",verdict=\"would_reject\"}"), Some(1.0));
    assert_eq!(agent.sample("depfence_service_mode{service=\"app\",mode=\"audit\"}"), Some(1.0));
    assert_eq!(agent.sample("depfence_policy_generation"), Some(2.0));
    assert_eq!(agent.sample("depfence_policy_last_reload_successful"), Some(1.0));
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
    let removed = cgroups.children.pop().unwrap();
    removed.remove().unwrap();
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
    let mut cgroups = Cgroups::new();
    let app = cgroups.child("app");
    let (db, other) = (tcp_listener(LO4), tcp_listener(LO4));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    write_policy(&policy, &cgroups.relative(), "enforce", db);
    let mut agent = Agent::start(&policy, "prod");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
    agent.wait_status("counted", |s| service(s, "app").is_some_and(|a| a.rejected == 1));
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
    assert_eq!((app_status.rejected, app_status.allowed), (201, 1), "counters carried on");
    assert_eq!(status.generation, 1, "same policy, same generation");
    assert_eq!(app_status.mode_since, since, "a restart is not a mode change");
    assert_eq!(probe(&app, "tcp", LO4, other, 1), Err(EPERM));
}
