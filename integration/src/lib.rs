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

/// Finds an executable on `PATH`, then in `/usr/sbin` and `/sbin` (where dnsmasq lives).
pub fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|file| file.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The path of `tool` when it is installed. Otherwise prints why `test` skips (naming the
/// Debian `package` that has it; `scripts/setup` installs them all) and returns None; under CI
/// (`CI=true`) a skip is a failure, so it panics instead.
pub fn require_tool(test: &str, tool: &str, package: &str) -> Option<std::path::PathBuf> {
    if let Some(path) = find_tool(tool) {
        return Some(path);
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let why = format!("`{tool}` is not installed (apt-get install {package}, or run scripts/setup)");
    assert!(!in_ci, "{test}: cannot run in CI: {why}");
    eprintln!("skipping {test}: {why}");
    None
}

/// A loopback TCP port that was free a moment ago. Another process may take it before the caller
/// binds it: callers that start a server on it retry on "address in use".
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

pub mod agent;
pub mod dns;
pub mod fixture;
pub mod prometheus;
