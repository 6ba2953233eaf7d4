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

/// The tests of this file one at a time: each compares the `depfence-run-*` cgroups before and
/// after its runs, which another test's run would change meanwhile.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RUNS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    let _serial = serial();
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
    let _serial = serial();
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

/// The probe of `run_passes_no_descriptor_of_its_caller_and_sets_no_new_privs`, run as uid 65534
/// inside the run: connects with descriptor `argv[1]` to port `argv[2]`, and reports whether it
/// runs with `no_new_privs`.
const INHERITED_SOCKET_PROBE: &str = r#"
import socket, sys
fd, port = int(sys.argv[1]), int(sys.argv[2])
nnp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs:")][0]
try:
    socket.socket(fileno=fd).connect(("127.0.0.1", port))
    print("connected", "nnp", nnp)
except OSError as e:
    print("err", e.errno, "nnp", nnp)
"#;

/// Opens a TCP socket outside any cgroup of the run (inheritable, as a careless caller's socket
/// is), then runs `policyctl run` with `args` and the probe behind `--`.
const CALLER_WITH_A_SOCKET: &str = r#"
import os, socket, sys
policyctl, probe, port, *args = sys.argv[1:]
s = socket.socket()
s.set_inheritable(True)
fd = str(s.fileno())
args = [a.replace("FD", fd) for a in args]
os.execv(policyctl, [policyctl, "run", *args, "--", "setpriv", "--reuid=65534", "--regid=65534",
    "--clear-groups", "/usr/bin/python3", "-c", probe, fd, port])
"#;

/// A socket is judged by the cgroup it was created in: one the caller opened outside would
/// connect past the policy, so the command does not get it (EBADF) unless the caller names it
/// with `--pass-fd`. And the command runs with `no_new_privs`. The probe is uid 65534.
#[test]
fn run_passes_no_descriptor_of_its_caller_and_sets_no_new_privs() {
    let test = "run_passes_no_descriptor_of_its_caller_and_sets_no_new_privs";
    if !depfence_integration::require_privileges(test)
        || depfence_integration::require_tool(test, "/usr/bin/python3", "python3").is_none()
        || depfence_integration::require_tool(test, "setpriv", "util-linux").is_none()
    {
        return;
    }
    let _serial = serial();
    let (web, other) = (http_server(), http_server());
    let policy = policy(web);
    let policyctl = assert_cmd::cargo::cargo_bin("policyctl");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new("/usr/bin/python3");
        cmd.args(["-c", CALLER_WITH_A_SOCKET]).arg(&policyctl).args([INHERITED_SOCKET_PROBE, &other.to_string()]);
        cmd.args(["--service", "deploy", "--mode", "enforce"]).args(extra).arg(policy.path());
        let out = cmd.output().unwrap();
        (String::from_utf8_lossy(&out.stdout).trim().to_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The caller's socket is not there: the probe cannot use it to reach `other`.
    let (stdout, stderr) = run(&[]);
    assert_eq!(stdout, format!("err {EBADF} nnp 1"), "{stderr}");
    // Named with --pass-fd it is passed on, and keeps the caller's (unpoliced) cgroup: the
    // help says so.
    let (stdout, stderr) = run(&["--pass-fd", "FD"]);
    assert_eq!(stdout, "connected nnp 1", "{stderr}");
    // A descriptor that is not open is a usage error, before anything runs.
    let out = Command::cargo_bin("policyctl")
        .unwrap()
        .args(["run", "--service", "deploy", "--pass-fd", "999"])
        .arg(policy.path())
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("descriptor 999 is not open"));
    let help = Command::cargo_bin("policyctl").unwrap().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("only its standard streams") && help.contains("no_new_privs"), "{help}");
}

/// The errno of a descriptor that is not open, on Linux.
const EBADF: i32 = 9;
