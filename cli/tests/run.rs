//! `policyctl run` on a real kernel (root, cgroup v2, BPF): curl inside the run's cgroup is
//! counted (audit) or refused (enforce) for a destination the policy does not allow. Skips with
//! a reason elsewhere; under CI a skip is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail by panicking")]

use assert_cmd::Command;

fn http_server() -> u16 {
    depfence_integration::fixture::http_server(depfence_integration::fixture::LO4)
}

fn policy(web_port: u16) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let text = format!(
        "version = 1\n[services.web]\nendpoints = [{{ ip = \"127.0.0.1\", ports = [{web_port}], proto = \"tcp\" }}]\n\
         [services.deploy]\nallow = [{{ service = \"web\" }}]\n"
    );
    std::fs::write(file.path(), text).unwrap();
    file
}

fn leftover_run_cgroups() -> Vec<String> {
    let mount = depfence::cgroup::Cgroup2::discover().unwrap();
    std::fs::read_dir(mount.mount())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("depfence-run-"))
        .collect()
}

fn curl(port: u16) -> String {
    format!("curl -sS -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{port}/")
}

#[test]
fn run_reports_in_audit_and_refuses_in_enforce() {
    if !depfence_integration::require_privileges("run_reports_in_audit_and_refuses_in_enforce") {
        return;
    }
    let (web, other) = (http_server(), http_server());
    let policy = policy(web);
    let before = leftover_run_cgroups();

    // Audit: both requests succeed; the undeclared one is reported with the process that tried.
    let script = format!("{} && {}", curl(web), curl(other));
    let out = Command::cargo_bin("policyctl")
        .unwrap()
        .args(["run", "--service", "deploy", "--mode", "audit"])
        .arg(policy.path())
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n200\n");
    assert!(stderr.contains("policyctl run (audit): 1 allowed, 1 would-reject, 0 rejected"), "{stderr}");
    assert!(stderr.contains(&format!("would-reject 127.0.0.1:{other}/tcp")), "{stderr}");
    assert!(stderr.contains("by curl (pid "), "{stderr}");

    // Enforce: the declared dependency works, the other is refused, and curl's exit code (7:
    // could not connect) is passed through.
    let out = Command::cargo_bin("policyctl")
        .unwrap()
        .args(["run", "--service", "deploy", "--mode", "enforce"])
        .arg(policy.path())
        .args(["--", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200\n000\n");
    assert!(stderr.contains("policyctl run (enforce): 1 allowed, 0 would-reject, 1 rejected"), "{stderr}");
    assert!(stderr.contains(&format!("rejected     127.0.0.1:{other}/tcp")), "{stderr}");

    // The run's cgroup is gone afterwards.
    assert_eq!(leftover_run_cgroups(), before);
}

/// Processes the command leaves running would escape the policy with the cgroup; run ends
/// them with the command and says so.
#[test]
fn run_ends_what_the_command_left_running() {
    if !depfence_integration::require_privileges("run_ends_what_the_command_left_running") {
        return;
    }
    let policy = policy(http_server());
    let started = std::time::Instant::now();
    let out = Command::cargo_bin("policyctl")
        .unwrap()
        .args(["run", "--service", "deploy"])
        .arg(policy.path())
        .args(["--", "sh", "-c", "sleep 60 & echo $!"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "run did not wait for the background sleep");
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(stderr.contains("killed 1 process(es) the command left running"), "{stderr}");
    // Gone, not just moved elsewhere (a zombie awaiting its new parent's wait counts as gone).
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(state.is_empty() || state.contains(") Z "), "sleep {pid} still runs: {state}");
}
