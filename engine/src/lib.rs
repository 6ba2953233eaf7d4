//! depfence engine: the policy language, the compiler with its dependency-graph checks, the
//! compiled [`snapshot::Snapshot`] that every consumer reads (kernel datapath, in-process guard,
//! DNS proxy, `explain`, the agent), and those consumers.
//!
//! Data flow: [`policy`] (TOML with spans) → [`compile`] ([`compile::compile_path`]: names,
//! rules, graph checks) → [`snapshot::Snapshot`] (immutable, content-hashed, with its owner
//! index and rule order) → [`lower`] (kernel map entries) → `datapath` (the loader) and `agent`
//! (the daemon), and [`guard`], [`dns`], [`explain`], [`promote`] beside them. Every decision
//! goes through [`verdict::decide`]. Problems are [`diag::Diagnostic`]s with a location, a typed
//! [`problem::Problem`] and help. ARCHITECTURE.md in the repository maps each folder and each
//! decision.

#[cfg(feature = "agent")]
pub mod agent;
pub mod cgroup;
pub mod compile;
pub mod control_protocol;
#[cfg(feature = "datapath")]
pub mod datapath;
pub mod dependents;
pub mod deploy;
pub mod diag;
pub mod diff;
#[cfg(feature = "dns")]
pub mod dns;
pub mod durable;
pub mod explain;
#[cfg(feature = "export")]
pub mod export;
pub mod graph;
#[cfg(feature = "guard")]
pub mod guard;
pub mod learn;
pub mod lower;
pub mod policy;
pub mod problem;
pub mod promote;
pub mod snapshot;
pub mod synth;
pub mod timefmt;
pub mod usage;
pub mod verdict;
