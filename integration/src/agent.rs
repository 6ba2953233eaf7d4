//! A real `policyctl agent` process for tests, with its own pins, state, control socket and
//! metrics port; it cleans up on drop. Its policy selects cgroups made with
//! [`crate::fixture::Cgroup`].
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test fixtures fail the test by panicking, with the reason"
)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use depfence::agent::control::{self, AgentStatus, Request};
use depfence::datapath::pins::{PinLayout, ensure_bpffs, random_suffix};

/// A running `policyctl agent` with its own pins, state, socket and metrics port; stopped
/// (SIGKILL by PID) and its pins removed on drop.
pub struct Agent {
    policyctl: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    pins: PinLayout,
    state: tempfile::TempDir,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its metrics port on 127.0.0.1.
    pub metrics: u16,
    log: PathBuf,
}

/// How many times the agent is started on a fresh metrics port when its port was taken
/// between choosing and binding it.
const PORT_ATTEMPTS: usize = 5;

impl Agent {
    /// Starts `policyctl agent` (the binary at `policyctl`) and waits until it is ready.
    pub fn start(policyctl: &Path, policy: &Path, environment: &str) -> Self {
        Self::start_with(policyctl, policy, environment, &[])
    }

    /// [`Agent::start`] with more command-line options.
    pub fn start_with(policyctl: &Path, policy: &Path, environment: &str, extra_args: &[&str]) -> Self {
        let (bpffs, _) = ensure_bpffs().unwrap();
        let pins = PinLayout::new(bpffs.join(format!("depfence-test-agent-{}", random_suffix())));
        Self::start_on(policyctl, policy, environment, pins, extra_args)
    }

    /// [`Agent::start_with`] on the pin root `pins` (which may hold what another loader pinned);
    /// everything under it is removed on drop.
    pub fn start_on(policyctl: &Path, policy: &Path, environment: &str, pins: PinLayout, extra_args: &[&str]) -> Self {
        let state = tempfile::tempdir().unwrap();
        let socket = state.path().join("control.sock");
        let log = state.path().join("agent.log");
        let mut agent = Agent {
            policyctl: policyctl.to_owned(),
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            pins,
            socket,
            metrics: crate::free_loopback_port().unwrap(),
            log,
            state,
        };
        agent.spawn(policy, environment);
        agent
    }

    /// (Re)starts the agent process on the same pins and state, and waits until it is ready.
    /// When its metrics port was taken in the meantime (tests run in parallel and their
    /// clients take ephemeral ports), it starts again on another free port.
    pub fn spawn(&mut self, policy: &Path, environment: &str) {
        for _ in 0..PORT_ATTEMPTS {
            if self.spawn_once(policy, environment) {
                return;
            }
            self.metrics = crate::free_loopback_port().unwrap();
        }
        panic!("agent: no free metrics port in {PORT_ATTEMPTS} attempts; log:\n{}", self.log_text());
    }

    /// Starts the agent and waits until it is ready (true), or until it exits because its
    /// metrics port is in use (false); panics on any other failure.
    fn spawn_once(&mut self, policy: &Path, environment: &str) -> bool {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = Command::new(&self.policyctl)
            .arg("agent")
            .arg(policy)
            .args(["--environment", environment, "--metrics-listen", &format!("127.0.0.1:{}", self.metrics)])
            .arg("--pin-root")
            .arg(self.pins.root())
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                let log = self.log_text();
                if log.contains("Address already in use") && log.contains("metrics exporter") {
                    return false;
                }
                panic!("agent exited ({status}) before it was ready; log:\n{log}");
            }
            if self.try_status().is_ok_and(|s| s.ready) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready in 20 s; log:\n{}", self.log_text());
    }

    /// The agent's status, or why it did not answer.
    pub fn try_status(&self) -> Result<AgentStatus, control::ClientError> {
        let body = control::request(&self.socket, &Request::Status)?;
        Ok(serde_json::from_value(body).unwrap())
    }

    /// The agent's status.
    pub fn status(&self) -> AgentStatus {
        self.try_status().unwrap_or_else(|e| panic!("status: {e}; log:\n{}", self.log_text()))
    }

    /// The agent process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Everything the agent logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (a clean stop), and wait for it to exit; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(sent.success(), "kill -TERM {}", child.id());
        child.wait().unwrap()
    }

    /// Where it pins its maps and links.
    pub fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// SIGKILL, and wait for it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The metrics page.
    pub fn metrics(&self) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics)).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }

    /// The value of one sample line of the metrics page (`name{labels}`), or None.
    pub fn sample(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// Waits until `check` holds for the status (the agent works in 100 ms – 1 s ticks).
    pub fn wait_status(&self, what: &str, check: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
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
