//! depfence engine: the policy language, the compiler with its dependency-graph checks, and the
//! compiled [`snapshot::Snapshot`] that every consumer (kernel datapath, in-process guard, CLI)
//! reads.
//!
//! Data flow: [`policy::load`] (TOML with spans) → [`compile::compile`] (names, rules, graph
//! checks) → [`snapshot::Snapshot`] (immutable, content-hashed). Problems are
//! [`diag::Diagnostic`]s with a location, a typed [`problem::Problem`] and help.

#[cfg(feature = "agent")]
pub mod agent;
pub mod cgroup;
pub mod compile;
#[cfg(feature = "datapath")]
pub mod datapath;
pub mod diag;
#[cfg(feature = "dns")]
pub mod dns;
pub mod durable;
pub mod explain;
pub mod graph;
#[cfg(feature = "guard")]
pub mod guard;
pub mod lower;
pub mod policy;
pub mod problem;
pub mod promote;
pub mod snapshot;
pub mod synth;
pub mod timefmt;
pub mod verdict;
