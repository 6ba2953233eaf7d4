//! `policyctl agent`: the daemon that keeps a policy in force on one machine.
//!
//! The data flow: the policy's files (followed by `watcher`) are compiled (`compiler`, which
//! starts at a change, while the writes settle) and applied by the `state` task to the cgroups `discovery` matched, through the `kernel` books onto a
//! `dataplane` (the pinned eBPF maps and links); the kernel's counters and events come back
//! into `telemetry` (metrics, the event log) and the evidence of `crate::promote`. `control` is
//! the socket `policyctl` talks to, `dns` the agent's DNS proxy, `run` the loop that ties them
//! together, and `config` its settings.
//!
//! When the agent stops (or dies), the pinned programs and maps keep enforcing; the next agent
//! adopts them.

mod compiler;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod discovery;
mod dns;
#[cfg(test)]
mod fake;
pub mod kernel;
pub mod lock;
mod publish;
mod run;
pub mod state;
pub mod telemetry;
#[cfg(test)]
mod tests;
mod watcher;

pub use config::{
    AgentConfig, AgentError, DEFAULT_METRICS_LISTEN, DEFAULT_PIN_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DIR, DnsSettings,
};
pub use run::run;
