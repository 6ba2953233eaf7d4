//! The guard's metrics, named like the kernel path's (`depfence_connections_total{service,
//! verdict}` with verdict `allowed`, `would_reject` or `rejected`). They go to whatever
//! recorder the process installed with the `metrics` crate (a Prometheus exporter, say).

use metrics::{SharedString, counter, describe_counter};

use super::{Decision, LoadError, Reloaded};

/// Calls judged by the in-process guard: labels `service` (the caller), `backend` (the backend
/// service, or `unknown`) and `verdict` (`allowed`, `would_reject`, `rejected`).
pub const RPC_CALLS_TOTAL: &str = "depfence_rpc_calls_total";

/// Snapshot reloads of the guard by `result`: `success` (a new snapshot is in force),
/// `unchanged` or `failure` (the last good snapshot stays).
pub const GUARD_RELOADS_TOTAL: &str = "depfence_guard_reloads_total";

/// The `backend` label of a call whose authority names no service.
pub const UNKNOWN_BACKEND: &str = "unknown";

/// Registers the help text of the guard's metrics with the installed recorder (once, at
/// start-up, after installing it).
pub fn describe_metrics() {
    describe_counter!(RPC_CALLS_TOTAL, "RPC calls judged by the in-process guard, by service, backend and verdict.");
    describe_counter!(GUARD_RELOADS_TOTAL, "Snapshot reloads of the in-process guard by result.");
}

pub(super) fn record_call(decision: &Decision, service: &str) {
    let (caller, backend) = decision.labels();
    let service: SharedString = caller.map_or_else(|| SharedString::from_owned(service.to_owned()), SharedString::from);
    let backend: SharedString = backend.map_or(SharedString::const_str(UNKNOWN_BACKEND), SharedString::from);
    counter!(RPC_CALLS_TOTAL, "service" => service, "backend" => backend, "verdict" => decision.verdict.as_str())
        .increment(1);
}

pub(super) fn record_reload(result: &Result<Reloaded, LoadError>) {
    let label = match result {
        Ok(Reloaded::Replaced { .. }) => "success",
        Ok(Reloaded::Unchanged) => "unchanged",
        Err(_) => "failure",
    };
    counter!(GUARD_RELOADS_TOTAL, "result" => label).increment(1);
}
