//! Shared fixtures of the privileged tests: the privilege check that skips with a reason on a
//! machine without root or cgroup v2, and fails instead under CI (`CI=true`).

use depfence::cgroup::Cgroup2;

/// Why this machine cannot run privileged tests, or None when it can.
fn missing_privilege() -> Option<String> {
    if let Err(e) = Cgroup2::discover() {
        return Some(e.to_string());
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().next());
    (uid != Some("0")).then(|| "not running as root".to_owned())
}

/// True when the test may run. Otherwise prints why it skips and returns false; under CI a skip
/// is a failure, so it panics instead.
pub fn require_privileges(test: &str) -> bool {
    let Some(why) = missing_privilege() else { return true };
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!in_ci, "{test}: privileged test cannot run in CI: {why}");
    eprintln!("skipping {test}: {why}");
    false
}

/// A name no other test run uses, for cgroups and pins.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

pub mod agent;
pub mod fixture;
pub mod prometheus;
