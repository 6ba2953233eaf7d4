//! How the agent runs: its settings ([`AgentConfig`], with the defaults), and why it could not
//! start ([`AgentError`]).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::kernel;
use crate::datapath::abi;
use crate::dns::{DenyResponse, TtlBounds};

/// Where the agent pins its maps and links by default.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/depfence";
/// Where the agent keeps its state (counter slots, promotion log, evidence) by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/depfence";
/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/depfence/control.sock";
/// Default metrics address: loopback only.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Policy file or directory.
    pub policy: PathBuf,
    /// The environment this machine is in (selects each service's mode).
    pub environment: String,
    /// bpffs directory for pins.
    pub pin_root: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Control socket.
    pub control_socket: PathBuf,
    /// Prometheus listen address (None: no exporter).
    pub metrics_listen: Option<SocketAddr>,
    /// How often the cgroup tree is scanned.
    pub scan_interval: Duration,
    /// How long the policy's files must stay unchanged before a reload reads them (editors and
    /// `git pull` write in several steps; a half-written policy would only fail to compile and
    /// be read again, but costs a compile).
    pub reload_settle: Duration,
    /// Exact-rule capacity of the kernel map (two generations must fit during a swap).
    pub rule_capacity: u32,
    /// What `promote --enforce` requires.
    pub gate: crate::promote::GateConfig,
    /// The DNS proxy for services with host rules (None: no proxy, and host rules allow
    /// nothing).
    pub dns: Option<DnsSettings>,
    /// How long to wait for another agent that holds the pin root or the state directory to
    /// exit (or, with `takeover`, to stop).
    pub lock_wait: Duration,
    /// Stop (SIGTERM) the agent that holds the pin root or the state directory, then wait for
    /// it, instead of only waiting.
    pub takeover: bool,
    /// The subtree of the cgroup2 mount this agent polices (relative to the mount); the policy's
    /// cgroup paths are relative to it. None: the whole tree. For an agent whose machine is a
    /// cgroup subtree (a container, a test host).
    pub cgroup_root: Option<PathBuf>,
}

/// How the agent's DNS proxy runs.
#[derive(Debug, Clone, Default)]
pub struct DnsSettings {
    /// Its port on loopback; 0 takes a free one (the kernel redirect learns it either way).
    pub port: u16,
    /// Upstream servers; empty: the nameservers of /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    /// The answer to a denied name in enforce.
    pub deny: DenyResponse,
    /// How long an answered address stays allowed.
    pub ttl: TtlBounds,
}

impl AgentConfig {
    /// The defaults for a policy and an environment.
    pub fn new(policy: PathBuf, environment: String) -> Self {
        Self {
            policy,
            environment,
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            control_socket: PathBuf::from(DEFAULT_SOCKET),
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().ok(),
            scan_interval: Duration::from_millis(250),
            reload_settle: Duration::from_millis(50),
            rule_capacity: abi::MAX_RULES,
            gate: crate::promote::GateConfig::default(),
            dns: Some(DnsSettings::default()),
            lock_wait: Duration::from_secs(10),
            takeover: false,
            cgroup_root: None,
        }
    }
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No cgroup v2.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The kernel side could not be set up (needs root: CAP_BPF, CAP_SYS_ADMIN).
    #[error("kernel datapath: {0}")]
    Kernel(#[from] kernel::KernelError),
    /// A directory or socket could not be made.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metrics exporter could not start.
    #[error("metrics exporter on {addr}: {message}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The DNS proxy could not start.
    #[error("dns proxy: {0}")]
    Dns(#[from] crate::dns::DnsError),
    /// Another agent holds the pin root or the state directory.
    #[error(transparent)]
    Locked(#[from] super::lock::LockError),
    /// The policy does not declare the agent's environment.
    #[error("the policy has no environment `{environment}` (it declares: {declared})")]
    UnknownEnvironment {
        /// The one asked for.
        environment: String,
        /// The declared ones.
        declared: String,
    },
}

pub(super) fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
    move |source| AgentError::Io { what, path: path.to_owned(), source }
}
